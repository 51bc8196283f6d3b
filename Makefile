# make pipeline   the four scripts with their defaults (width 1.0: meant for a GPU)
# make demo       the same chain at CPU size: width 0.25, 10 + 3 epochs (about 35 min on 2 cores)
# make test       the tests (CPU, no internet, about a minute)
PYTHON ?= python
DATA_DIR ?= data/cifar10
DATA = --data-dir $(DATA_DIR)

.PHONY: install pipeline demo test
install:
	$(PYTHON) -m pip install -r requirements-dev.txt

pipeline:
	$(PYTHON) train.py $(DATA)
	$(PYTHON) sensitivity.py $(DATA)
	$(PYTHON) prune.py $(DATA) --sparsity checkpoints/sparsity_suggested.json
	$(PYTHON) finetune.py $(DATA)

demo:
	$(PYTHON) train.py $(DATA) --width 0.25 --epochs 10
	$(PYTHON) sensitivity.py $(DATA) --scan-size 2000
	$(PYTHON) prune.py $(DATA) --sparsity checkpoints/sparsity_suggested.json
	$(PYTHON) finetune.py $(DATA) --epochs 3

test:
	$(PYTHON) -m pytest
