# The two commands of the README. Each installs what it needs into .venv first.
.PHONY: quickstart test install docs

quickstart:
	scripts/install.sh
	.venv/bin/korch run jobs/quickstart.yaml

test:
	scripts/install.sh test
	scripts/test.sh

docs:
	.venv/bin/python -m korch.docs --write README.md
