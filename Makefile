# make pipeline   the four scripts at width 1.0 (meant for a GPU), pruned to 92% with the
#                 scan's suggestion: about 5 min on one H200
# make demo       the same chain at CPU size (width 0.25), pruned to 80% with the scan's
#                 suggestion: about 30 min on 2 CPU cores
# make test       the tests (CPU, tiny generated data, no internet)
PYTHON ?= python
DATA_DIR ?= data/cifar10
DATA = --data-dir $(DATA_DIR)

.PHONY: install pipeline demo test
install:
	$(PYTHON) -m pip install -r requirements-dev.txt

pipeline:
	$(PYTHON) train.py $(DATA)
	$(PYTHON) sensitivity.py $(DATA) --scan-size 2000 --sparsities 0.6,0.7,0.8,0.9,0.95,0.98 \
	    --target-sparsity 0.92
	$(PYTHON) prune.py $(DATA) --sparsity checkpoints/sparsity_suggested.json
	$(PYTHON) finetune.py $(DATA)

demo:
	$(PYTHON) train.py $(DATA) --width 0.25 --epochs 10
	$(PYTHON) sensitivity.py $(DATA) --scan-size 2000 --target-sparsity 0.8
	$(PYTHON) prune.py $(DATA) --sparsity checkpoints/sparsity_suggested.json
	$(PYTHON) finetune.py $(DATA)

test:
	$(PYTHON) -m pytest
