"""`korch bench data`: the same corpus through four engines, docs/s and peak RSS of each, one JSON line.

    korch bench data --corpus ../shared/data/kowiki_sample ../shared/data/korean_petitions --scale 1

Engines (each in a fresh subprocess, so peak RSS is its own):
- `single`: korch's steps in one process (`prepare_corpus(engine="local")`): read, clean, Kiwi, WordPiece, pack, write.
- `linecache`: the old workflow's reader (`linecache.getline(path, i)` for every line) feeding the same steps.
- `korch`: `prepare_corpus` as `korch run` calls it (`korch.data.pool` decides): under 4 free CPUs on this
  machine alone, the driver's own Kiwi with a thread per CPU, fed one stream over all chunks; otherwise (or
  with `--actors`) Ray Data with a Kiwi actor pool. For a pool, Ray is started before the clock starts (in
  `korch run` it is already up); actor start-up and Kiwi loading are timed. The driver's own Kiwi runs with no
  Ray up, as `korch run` runs such a data stage (`korch.train.job.needs_ray`). Peak RSS is the largest sum,
  sampled every 0.2 s, over the driver and the Ray worker processes.
- `kiwi_mt`: for reference, read + clean, then one `Kiwi(num_workers=cores).split_into_sents(all paragraphs)`
  (Kiwi's own thread pool; no WordPiece or packing).
`single`, `linecache` and `korch` hand Kiwi batches of documents' paragraphs (`DocumentProcessor`), one
analyser thread per process or actor.

The corpus is written as jsonl: copy 0 is the cleaned source documents, copy k > 0 perturbs each document
(paragraphs rotated, a copy marker appended) so dedup keeps it and Kiwi does comparable work.
`rss_growth_10x` is korch's peak RSS on a 10x larger corpus over its peak on the base corpus.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ENGINES = ("single", "linecache", "korch", "kiwi_mt")


def perturb(text: str, copy: int) -> str:
    """Copy 0 unchanged; copy k rotates the paragraphs by k and tags the first one, so no two copies are equal."""
    if copy == 0:
        return text
    paras = text.split("\n")
    k = copy % len(paras)
    paras = paras[k:] + paras[:k]
    paras[0] = f"{paras[0]} ({copy})"
    return "\n".join(paras)


def write_corpus(sources: list[str], out_dir: str, copies: int, max_docs: int | None) -> list[str]:
    """Write `copies` jsonl files of the (cleaned) source documents; returns their paths."""
    from korch.config import DataConfig

    from .readers import iter_documents

    cfg = DataConfig(inputs=sources, max_docs=max_docs)
    docs = list(iter_documents(list(cfg.inputs), cfg))
    if not docs:
        from korch.errors import UserError

        raise UserError(f"--corpus {' '.join(sources)}: no documents to benchmark; give corpus files or folders "
                        "(txt, jsonl, parquet, wiki)")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for copy in range(copies):
        path = os.path.join(out_dir, f"copy-{copy:04d}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": perturb(doc, copy)}, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


# --- engines (run inside the subprocess) ----------------------------------------------------------------------

def _self_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _engine_single(cfg, tokenizer_dir, out_dir, actors) -> int:
    from .pipeline import prepare_corpus

    return prepare_corpus(cfg, tokenizer_dir, out_dir, progress=False, engine="local")["docs_in"]


def _engine_korch(cfg, tokenizer_dir, out_dir, actors) -> int:
    from .pipeline import prepare_corpus

    from .pool import cluster_pool_shape, pipeline_kiwi_threads

    # What prepare_corpus picks: Kiwi in the driver on a small machine, else the pool (before chunk capping).
    threads = pipeline_kiwi_threads(cfg)
    pool = {"inline_kiwi_threads": threads} if threads is not None else cluster_pool_shape(cfg)._asdict()
    manifest = prepare_corpus(cfg, tokenizer_dir, out_dir, progress=False, engine="ray")
    return {"docs": manifest["docs_in"], "seconds_to_first_docs": manifest["seconds_to_first_docs"],
            "steady_docs_per_s": manifest["steady_docs_per_s"], "pool": pool}


def _engine_linecache(cfg, tokenizer_dir, out_dir, actors) -> int:
    import linecache

    from .pipeline import Progress, consume
    from .preprocess import DocumentProcessor, build_table, special_ids
    from .readers import expand_inputs, parse_lines

    processor = DocumentProcessor(cfg, tokenizer_dir)
    cls_id, sep_id = special_ids(tokenizer_dir)

    def tables():
        for src in expand_inputs(cfg.inputs, cfg.format):
            with open(src.path, "rb") as f:
                n_lines = sum(1 for _ in f)
            lines = (linecache.getline(src.path, i) for i in range(1, n_lines + 1))
            docs = parse_lines(src.fmt, lines, cfg.max_line_chars, cfg.text_fields, collections.Counter())
            while True:
                batch = list(itertools.islice(docs, 64))
                if not batch:
                    break
                bad: collections.Counter = collections.Counter()
                yield build_table(processor.process(batch, bad), bad)

    counts = consume(tables(), cfg, cls_id, sep_id, out_dir, collections.Counter(), Progress(False))
    return counts["docs_in"]


def _engine_kiwi_mt(cfg, tokenizer_dir, out_dir, actors) -> int:
    from kiwipiepy import Kiwi

    from .readers import iter_documents

    kiwi = Kiwi(num_workers=os.cpu_count() or 1)
    docs = 0

    def paragraphs():
        nonlocal docs
        for text in iter_documents(list(cfg.inputs), cfg.model_copy(update={"dedup": False})):
            docs += 1
            yield from text.split("\n")

    for _ in kiwi.split_into_sents(paragraphs(), return_tokens=cfg.morphemes):
        pass
    return docs


def _child(argv: list[str]) -> None:
    """Subprocess entry: run one engine and print {"docs", "seconds", "self_peak_mb"} as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("corpus_dir")
    parser.add_argument("tokenizer_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--actor-cpus", type=float, default=None)
    parser.add_argument("--kiwi-threads", type=int, default=None)
    args = parser.parse_args(argv)
    from korch.config import DataConfig

    cfg = DataConfig(inputs=[args.corpus_dir], seq_len=256, preprocess_actors=args.actors, actor_cpus=args.actor_cpus,
                     kiwi_threads=args.kiwi_threads)
    from .pool import inline_here

    if args.engine == "korch" and not inline_here(cfg):
        import ray

        from .pipeline import local_ray_options

        ray.init(**local_ray_options(os.cpu_count() or 2))

        @ray.remote(num_cpus=1)
        def _ready() -> None:
            return None

        # In `korch run` Ray is up before the data stage: let the prestarted workers finish booting
        # (importing Ray takes CPU) before the clock starts. One task per CPU, so no extra workers start.
        ray.get([_ready.remote() for _ in range(os.cpu_count() or 2)])
        time.sleep(1.0)
    # Imports every engine needs are paid before the clock (transformers alone takes seconds).
    import kiwipiepy  # noqa: F401

    from .preprocess import special_ids

    special_ids(args.tokenizer_dir)
    start = time.perf_counter()
    result = globals()[f"_engine_{args.engine}"](cfg, args.tokenizer_dir, args.out_dir, args.actors)
    seconds = time.perf_counter() - start
    result = result if isinstance(result, dict) else {"docs": result}
    print(json.dumps({**result, "seconds": seconds, "self_peak_mb": _self_peak_mb()}), flush=True)


# --- parent -----------------------------------------------------------------------------------------------------

_CLUSTER_PROCESSES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "/dashboard/", "log_monitor.py", "/autoscaler/",
                      "runtime_env/agent")


def _is_ray_worker(argv: list[str], cmd: str) -> bool:
    """Worker processes (idle workers, tasks, actors incl. Ray Data's own) but not raylet, GCS or agents; and
    korch's WordPiece helper process.

    raylet's own command line mentions default_worker.py (its worker template), so binaries are ruled out first.
    """
    if argv[1:3] == ["-m", "korch.data.preencode"]:
        return True
    head = " ".join(argv[:2])  # the program (and the script it runs), not flags that mention other parts
    if not argv or argv[0].endswith(("raylet", "gcs_server")) or any(name in head for name in _CLUSTER_PROCESSES):
        return False
    return cmd.startswith("ray::") or "default_worker.py" in cmd


def _tree_rss_mb(pid: int) -> float:
    """RSS of the process plus its Ray worker descendants (not raylet/GCS/agents, which are the cluster)."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = root.memory_info().rss
        for proc in root.children(recursive=True):
            try:
                argv = proc.cmdline()
                cmd = " ".join(argv)
                if _is_ray_worker(argv, cmd):
                    total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def run_engine(engine: str, corpus_dir: str, tokenizer_dir: str, out_dir: str, actors: int | None) -> dict:
    cmd = [sys.executable, "-m", "korch.data.bench", engine, corpus_dir, tokenizer_dir, out_dir]
    cmd += ["--actors", str(actors)] if actors else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_mb(proc.pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"bench engine {engine} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(max(peak, result["self_peak_mb"]) if engine == "korch" else result["self_peak_mb"], 1)
    result["docs_per_s"] = round(result["docs"] / result["seconds"], 1)
    print(f"[korch bench data] {engine}: {result['docs']} docs in {result['seconds']:.1f}s = "
          f"{result['docs_per_s']} docs/s, peak RSS {result['peak_rss_mb']} MB", flush=True)
    return result


def run_bench(corpus: list[str], scale: int = 1, max_docs: int | None = None, actors: int | None = None,
              skip_10x: bool = False, workdir: str | None = None, repeat: int = 1) -> dict:
    from .readers import iter_documents
    from .tokenizer import train_wordpiece

    from korch.config import DataConfig

    cores = os.cpu_count() or 2
    root = workdir or tempfile.mkdtemp(prefix="korch-bench-data-")
    os.makedirs(root, exist_ok=True)
    try:
        base_dir = os.path.join(root, "corpus_1x")
        write_corpus(corpus, base_dir, scale, max_docs)
        tok_dir = os.path.join(root, "tokenizer")
        cfg = DataConfig(inputs=[base_dir])
        train_wordpiece(itertools.islice(iter_documents([base_dir], cfg), 5000), tok_dir, 8000, 2)
        # Other tenants load this machine in waves, so with `repeat` > 1 the engines run interleaved and each
        # keeps its best docs/s (the run least disturbed) and its largest peak RSS.
        results: dict[str, dict] = {}
        by_round: list[dict[str, float]] = []
        for _ in range(repeat):
            by_round.append({})
            for engine in ENGINES:
                out = os.path.join(root, f"out_{engine}")
                shutil.rmtree(out, ignore_errors=True)
                run = run_engine(engine, base_dir, tok_dir, out, actors)
                by_round[-1][engine] = run["docs_per_s"]
                best = results.get(engine)
                if best is None or run["docs_per_s"] > best["docs_per_s"]:
                    run["peak_rss_mb"] = max(run["peak_rss_mb"], best["peak_rss_mb"] if best else 0)
                    results[engine] = run
                else:
                    best["peak_rss_mb"] = max(best["peak_rss_mb"], run["peak_rss_mb"])
        growth = None
        if not skip_10x:
            big_dir = os.path.join(root, "corpus_10x")
            write_corpus(corpus, big_dir, 10 * scale, max_docs)
            big = run_engine("korch", big_dir, tok_dir, os.path.join(root, "out_korch_10x"), actors)
            growth = round(big["peak_rss_mb"] / results["korch"]["peak_rss_mb"], 3)
            results["korch_10x"] = big
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    single = results["single"]["docs_per_s"]
    return {
        "bench": "data",
        "single_docs_per_s": single,
        "linecache_docs_per_s": results["linecache"]["docs_per_s"],
        "korch_docs_per_s": results["korch"]["docs_per_s"],
        "kiwi_mt_docs_per_s": results["kiwi_mt"]["docs_per_s"],
        "ratio": round(results["korch"]["docs_per_s"] / single, 3) if single else None,
        # Start-up (Ray Data's own actors, worker processes, Kiwi loading) is a fixed cost; these show
        # what the ratio converges to on a long corpus.
        "korch_startup_s": results["korch"].get("seconds_to_first_docs"),
        "korch_steady_docs_per_s": results["korch"].get("steady_docs_per_s"),
        "steady_ratio": (round(results["korch"]["steady_docs_per_s"] / single, 3)
                         if single and results["korch"].get("steady_docs_per_s") else None),
        "korch_10x_docs_per_s": results.get("korch_10x", {}).get("docs_per_s"),
        # korch / kiwi_mt within each round (the two ran back to back): shows how much of the best-of ratio is
        # the machine's noise.
        "korch_over_kiwi_mt_by_round": [round(r["korch"] / r["kiwi_mt"], 3) if r["kiwi_mt"] else None
                                        for r in by_round],
        "peak_rss_mb": {name: r["peak_rss_mb"] for name, r in results.items()},
        "rss_growth_10x": growth,
        "docs": results["single"]["docs"],
        "cores": cores,
        "pool": results["korch"].get("pool"),
        "repeat": repeat,
    }


if __name__ == "__main__":
    _child(sys.argv[1:])
