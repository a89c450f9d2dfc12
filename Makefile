# Two quick-start commands; each sets up its own virtual environment on a fresh machine.
#   make demo   generate 2k labelled digits with the shipped default pack, verify, preview
#   make test   run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 resolve from the package registry (a CUDA build that also runs on CPU).
TORCH := torch==2.14.1 torchvision==0.29.1
N ?= 2k

.PHONY: setup demo demo-random test default-pack study clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/synthgen generate --n $(N) --out demo/runs/digits --min-score 0.5
	$(BIN)/synthgen verify demo/runs/digits
	$(BIN)/synthgen preview demo/runs/digits --out demo/preview.png

# The same engine on a random-weight pack at another architecture (its images are noise).
demo-random: setup
	$(BIN)/synthgen pack random --preset tiny --out demo/packs/tiny
	$(BIN)/synthgen embed --images builtin:digits:train --pack demo/packs/tiny --out demo/banks/digits
	$(BIN)/synthgen generate --n $(N) --pack demo/packs/tiny --bank demo/banks/digits --out demo/runs/tiny \
		--steps 10 --shard-size 500 --min-score 0.2
	$(BIN)/synthgen verify demo/runs/tiny

# Retrain the shipped default packs from scratch (digits train split, fixed seeds; ~13 min on 2 idle cores;
# reproduces the teacher's weights bit for bit here), then distil the teacher to one step (~3 min).
default-pack: setup
	rm -rf engine/default_pack.new engine/default_pack_1step.new
	$(BIN)/synthgen train default-pack --out engine/default_pack.new
	rm -rf engine/default_pack && mv engine/default_pack.new engine/default_pack
	$(BIN)/synthgen train distill --pack engine/default_pack --steps 1 --out engine/default_pack_1step.new
	rm -rf engine/default_pack_1step && mv engine/default_pack_1step.new engine/default_pack_1step

# The training-value study on both real data sets (hours on 2 cores; resumes); tables, JSON and plots
# land in bench/results/study/.
study: setup
	$(BIN)/synthgen study --dataset digits --out studies/digits
	$(BIN)/synthgen study --dataset mnist5k --out studies/mnist5k
	mkdir -p bench/results/study
	for d in digits mnist5k; do cp studies/$$d/study.md bench/results/study/$$d.md; \
		cp studies/$$d/study.json bench/results/study/$$d.json; cp studies/$$d/study.png bench/results/study/$$d.png; done

test: setup
	PYTHONSAFEPATH=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf demo .pytest_cache
