# make pipeline   the five scripts at width 1.0 (meant for a GPU): train, scan, then iterative
#                 pruning with one global threshold, to 90% and on to 95% (10 finetuning epochs
#                 a round), then 4-bit weight sharing: the frontier's best method at 95%
# make demo       the same chain at CPU size (width 0.25)
# make gpu OUT=folder  width 1.0 on a GPU in one command, every log, JSON and plot under OUT
#                 (gpu.py: data, bench, train, scan, pipeline, quantize, a frontier subset);
#                 SMOKE=1 runs the same steps at tiny size on the CPU
# make frontier   every method x sparsity from checkpoints/dense.pt (GPU-sized)
# make frontier-cpu  the README's CPU frontier from the demo's dense.pt (width 0.25)
# make test       the tests (CPU, tiny generated data, no internet)
PYTHON ?= python
DATA_DIR ?= data/cifar10
DATA = --data-dir $(DATA_DIR)
SCAN = --scan-size 2000

.PHONY: install pipeline demo gpu frontier frontier-cpu test
install:
	$(PYTHON) -m pip install -r requirements-dev.txt

# Iterative pruning: each round prunes the finetuned model further, its masks held.
ITERATIVE = $(PYTHON) prune.py $(DATA) --method global --target 0.9 && $(PYTHON) finetune.py $(DATA) && \
	$(PYTHON) prune.py $(DATA) --checkpoint checkpoints/finetuned.pt --method global --target 0.95 && \
	$(PYTHON) finetune.py $(DATA)

pipeline:
	$(PYTHON) train.py $(DATA)
	$(PYTHON) sensitivity.py $(DATA) $(SCAN)
	$(ITERATIVE)
	$(PYTHON) quantize.py $(DATA)

demo:
	$(PYTHON) train.py $(DATA) --width 0.25 --epochs 10
	$(PYTHON) sensitivity.py $(DATA) $(SCAN)
	$(ITERATIVE)
	$(PYTHON) quantize.py $(DATA)

gpu:
	$(if $(OUT),,$(error make gpu needs OUT=folder, for example make gpu OUT=runs/gpu))
	$(PYTHON) gpu.py $(DATA) --out $(OUT) $(if $(filter 1 yes true,$(SMOKE)),--smoke)

frontier:
	$(PYTHON) frontier.py $(DATA)

frontier-cpu:
	$(PYTHON) frontier.py $(DATA) --methods uniform,global,global-gradual,global-iterative,random \
		--sparsities 0.9,0.95,0.98 --epochs 5 --quantize-epochs 1

test:
	$(PYTHON) -m pytest
