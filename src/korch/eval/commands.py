"""`korch eval ...`: one command group, each evaluation in its own module."""

from __future__ import annotations

EVALUATIONS = ("korch.eval.coref", "korch.eval.embed")


def register(sub) -> None:
    import importlib

    group = sub.add_parser("eval", help="evaluate an exported model (coref, embed)").add_subparsers(
        dest="eval_cmd", required=True, metavar="WHAT")
    for name in EVALUATIONS:
        importlib.import_module(name).register_eval(group)
