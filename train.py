"""Train the dense network on CIFAR-10 and save checkpoints/dense.pt.

    python train.py                                   # width 1.0, 50 epochs: GPU-sized
    python train.py --width 0.25 --epochs 10

The recipe: conv0 starts as a whitening filter bank of the training patches and the
other plain convs as partial identities; SGD with Nesterov momentum, a linear warm-up
then linear decay of the learning rate, a larger learning rate for biases, label
smoothing, weight decay on the conv/linear weights only; random 2-pixel translation
(reflected edges) + a flip every other epoch, done on whole batches on the device;
channels_last and bf16 autocast. --low-res-epochs trades accuracy for time.
A resumable state is saved after every epoch; continue an interrupted run with --resume.
"""
import argparse
import copy
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoint import ensure_writable, file_sha256, load_checkpoint, make_checkpoint, save_checkpoint
from cli import (add_common_args, cli, fraction, fraction_in, int_in, nonnegative_float, nonnegative_int,
                 positive_float, positive_int, run_args, seed_int, width)
from data import get_datasets, make_loaders
from model import build_model
from utils import (Interrupted, UserError, autocast, evaluate, get_device, measure, model_summary, progress,
                   set_seed, tta_label)


@dataclass(frozen=True)
class Recipe:
    """What a training run needs, built once from the flags of the same names (train.py
    --help says what each does); frontier.py makes its runs' recipes with dataclasses.replace."""
    epochs: int = 50
    lr: float = 0.05  # the peak, after a linear warm-up; then linear decay to 0
    batch_size: int = 128
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # conv and linear weights only
    bias_lr_scale: float = 16.0  # biases learn at this times lr
    label_smoothing: float = 0.2
    warmup: float = 0.2  # fraction of the steps
    translate: int = 2  # random translation, pixels
    low_res_epochs: int = 0  # the first epochs on images of low_res pixels
    low_res: int = 24
    seed: int = 0  # shuffle and augmentation (and, in train.py, the initial weights and the split)

    @classmethod
    def from_args(cls, args, **given):
        """The recipe of the parsed flags; `given` fields in place of flags a script has not."""
        return cls(**{name: getattr(args, name) for name in RECIPE_FLAGS if name not in given}, **given)


RECIPE_FLAGS = tuple(f.name for f in fields(Recipe))
# The finetuning recipe that finetune.py and frontier.py share: a few epochs at full size.
FINETUNE = {"epochs": 10, "lr": 0.05, "batch_size": 256, "low_res_epochs": 0}
# What defines a dense run: a resumed run takes these flags from its saved state.
RUN_FLAGS = (*RECIPE_FLAGS, "width", "train_subset", "val_size", "whiten", "dirac", "eval_views")


def get_args_parser(description=__doc__, epochs=50, lr=0.05, plots=False, resume=True, seed=True):
    """train.py's flags; finetune.py, quantize.py and frontier.py reuse them with their own defaults."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, plots)
    add = parser.add_argument
    if seed:  # frontier.py takes --seeds
        add("--seed", type=seed_int, default=0, help="seed for init, split and augmentation (default: %(default)s)")
    add("--epochs", type=positive_int, default=epochs, help="training epochs (default: %(default)s)")
    add("--batch-size", type=positive_int, default=128, help="training batch size (default: %(default)s)")
    add("--lr", type=positive_float, default=lr, help="peak learning rate (default: %(default)s)")
    add("--bias-lr-scale", type=positive_float, default=16.0,
        help="biases (BatchNorm shifts, classifier bias) learn at this times --lr; the conv "
             "weights ahead of a BatchNorm only change direction, the biases need bigger "
             "steps (default: %(default)s)")
    add("--momentum", type=fraction_in(False, True), default=0.9,
        help="Nesterov momentum, in [0, 1) (default: %(default)s)")
    add("--weight-decay", type=nonnegative_float, default=5e-4,
        help="L2 on conv/linear weights; BatchNorm and biases get none (default: %(default)s)")
    add("--label-smoothing", type=fraction, default=0.2,
        help="share of each target's probability spread evenly over the 10 classes, in [0, 1] "
             "(default: %(default)s)")
    add("--translate", type=int_in(0, 31), default=2,
        help="random translation of training images by up to this many pixels, the "
             "uncovered edge filled by reflection (default: %(default)s)")
    add("--low-res-epochs", type=nonnegative_int, default=0, metavar="N",
        help="train the first N epochs on images scaled down to --low-res pixels (at 24, "
             "about 0.6x the time of a full-size epoch on a CPU; on a GPU a batch-128 step "
             "costs the same either way); later epochs use full size (default: %(default)s)")
    add("--low-res", type=int_in(8, 32), default=24, help="side of the low-res images, 8 to 32 (default: %(default)s)")
    add("--warmup", type=fraction_in(False, True), default=0.2,
        help="fraction of steps spent warming the lr up from 0, in [0, 1); it then decays "
             "linearly to 0 (default: %(default)s)")
    add("--train-subset", type=positive_int, default=None, metavar="N",
        help="train on only N images of the training split, for quick runs (default: all)")
    add("--compile", action="store_true",
        help="torch.compile the training step: a lever for a GPU; on a 2-core CPU it took up to "
             "44 s to compile and then ran 0.6 to 0.7x as fast (bench.py --compile)")
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
        help="CUDA: cuDNN times its convolution algorithms on the first batches and keeps the "
             "fastest (default: on)")
    if resume:
        add("--resume", action="store_true",
            help="continue the interrupted run from its last saved epoch")
    return parser


def get_train_args_parser():
    parser = get_args_parser()
    parser.add_argument("--width", type=width, default=1.0,
                        help="channel multiplier; 0.25 suits a CPU (default: %(default)s)")
    parser.add_argument("--val-size", type=nonnegative_int, default=5000,
                        help="training images held out for validation (default: %(default)s)")
    parser.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=True,
                        help="start conv0 as a whitening filter bank of the training patches "
                             "(default: %(default)s)")
    parser.add_argument("--dirac", action=argparse.BooleanOptionalAction, default=True,
                        help="start the other plain convs as identities on their first channels "
                             "(default: %(default)s)")
    parser.add_argument("--val-every", type=positive_int, default=5, metavar="N",
                        help="validate every N epochs and after the last; each pass costs "
                             "4 forward passes per validation image (default: %(default)s)")
    return parser


@torch.no_grad()
def whitening_init(conv, loader, num_images=2000, eps=1e-2):
    """Start the first conv as a whitening filter bank: the top principal directions
    of the training set's 3x3 patches, scaled to unit variance, each with both signs
    (the ReLU after it keeps one half of each). Channels beyond that stay random."""
    images = loader.normalize(loader.images[:num_images]).float().contiguous()
    patches = torch.nn.functional.unfold(images, conv.kernel_size).transpose(1, 2).flatten(0, 1)
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    order = eigenvalues.argsort(descending=True)
    filters = (eigenvectors[:, order] / (eigenvalues[order] + eps).sqrt()).T  # (27, 27)
    n = min(conv.out_channels // 2, len(filters))
    conv.weight[:2 * n] = torch.cat([filters[:n], -filters[:n]]).view(2 * n, *conv.weight.shape[1:])


@torch.no_grad()
def dirac_init(model):
    """Start each plain conv after conv0 as the identity on its first min(in, out) channels,
    so that the deep network begins close to a shallow one (as airbench does)."""
    for name, conv in model.backbone.named_children():
        if name.startswith("conv") and name != "conv0":
            n = min(conv.in_channels, conv.out_channels)
            nn.init.dirac_(conv.weight[:n])


def build_optimizer(model, lr, momentum, weight_decay, bias_lr_scale=1.0):
    """SGD with Nesterov momentum. Weight decay only on tensors with dim > 1; biases
    (BatchNorm shifts, the classifier's bias) at bias_lr_scale * lr."""
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if p.dim() > 1], "weight_decay": weight_decay},
              {"params": [p for n, p in named if p.dim() <= 1 and not n.endswith("bias")],
               "weight_decay": 0.0},
              {"params": [p for n, p in named if p.dim() <= 1 and n.endswith("bias")],
               "weight_decay": 0.0, "lr": lr * bias_lr_scale}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def build_scheduler(optimizer, total_steps, warmup):
    """Per-step lr factor: linear from 0 to 1 over `warmup` of the steps, then down to 0."""
    peak = max(1, round(warmup * total_steps))

    def factor(step):
        return step / peak if step < peak else max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, loader, optimizer, scheduler, label_smoothing=0.0, after_step=None, desc="train",
                    forward=None, epoch=0, seed=0):
    """One pass over loader.batches(epoch, seed) -> the mean training loss. `forward` computes
    the logits (default: model itself; fit passes a compiled model with --compile).
    after_step.apply(model, step) runs after every optimizer step: a pruner re-applies its
    masks, so pruned weights stay zero (a gradual one recomputes them when due); a quantizer
    re-centres its codebooks."""
    model.train()
    total_loss = torch.zeros((), device=loader.device)  # summed on the device: no sync per step
    for x, y in progress(loader.batches(epoch, seed), desc=desc, total=len(loader), leave=False):
        with autocast(loader.device):
            loss = F.cross_entropy((model if forward is None else forward)(x), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step.apply(model, step=scheduler.last_epoch)
        total_loss += loss.detach()
    return total_loss.item() / max(1, len(loader))


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(model, loaders, recipe, after_step=None, state_path=None, resume=None, source=None, flags=None,
        desc="epoch", val_every=1, best_from=None, compile=False):
    """Train for recipe.epochs -> (history: a dict per epoch, best).

    Validation runs every `val_every` epochs and after the last (val_acc NaN in between).
    `after_step` (a FineGrainedPruner or a KMeansQuantizer) runs after every optimizer step
    (train_one_epoch). With best_from, best is the epoch from that one on with the highest
    val_acc, kept in memory: {"epoch", "model", "after_step"} state dicts; else None.
    After each epoch a resumable state goes to `state_path` (None: not saved); `resume`,
    such a state read back, goes on from it. The state records the script's `flags` (for
    load_resume) and `source`, the checkpoint the run started from: a resume from another
    one is refused."""
    origin = None if source is None else file_sha256(source)
    forward = torch.compile(model) if compile else None  # shares model's weights
    model.train()
    optimizer = build_optimizer(model, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.bias_lr_scale)
    scheduler = build_scheduler(optimizer, recipe.epochs * len(loaders["train"]), recipe.warmup)
    history, best = [], None
    if resume is not None:
        history, best = restore(resume, model, optimizer, scheduler, after_step, loaders["train"].device,
                                (origin, desc, best_from is not None), source)
        print(f"resuming after epoch {len(history)} of {recipe.epochs} from {state_path}")
    epoch = len(history)
    try:
        for epoch in range(len(history), recipe.epochs):
            t0 = time.perf_counter()
            loss = train_one_epoch(model, loaders["train"], optimizer, scheduler, recipe.label_smoothing, after_step,
                                   f"{desc} {epoch + 1}/{recipe.epochs}", forward, epoch, recipe.seed)
            seconds = time.perf_counter() - t0
            validate = (epoch + 1) % val_every == 0 or epoch + 1 == recipe.epochs
            history.append({"epoch": epoch + 1, "train_loss": loss,
                            "val_acc": evaluate(model, loaders["val"]) if validate else float("nan"),
                            "seconds": seconds, "images_per_s": loaders["train"].num_samples / seconds,
                            "lr": optimizer.param_groups[0]["lr"]})
            if best_from is not None and is_best(history, best_from):
                best = {"epoch": epoch + 1, "model": copy.deepcopy(model.state_dict()),
                        "after_step": copy.deepcopy(after_step and after_step.state_dict())}
            tqdm.write(epoch_line(desc, recipe.epochs, history, best_from, best))
            if state_path is not None:
                save_checkpoint({"stage": "resume", "model": model.state_dict(), "epoch": epoch + 1,
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "rng": rng_state(), "history": history, "args": flags or {},
                                 "pruner": after_step and after_step.state_dict(), "best": best, "source": origin,
                                 "loop": desc}, state_path)
    except KeyboardInterrupt:
        if state_path is None:
            raise  # the caller knows what was saved
        where = (f"{state_path} (after epoch {epoch}); continue with the same command plus --resume"
                 if epoch > 0 else "none yet: no epoch finished")
        raise Interrupted(f"during epoch {epoch + 1}. Last good state: {where}") from None
    return history, best


def is_best(history, best_from):
    """Whether the last epoch is the best so far among those from epoch best_from on (the
    ones at the final sparsity); with no validation (NaN), the latest is."""
    eligible = history[best_from - 1:]
    return bool(eligible) and not history[-1]["val_acc"] < max(h["val_acc"] for h in eligible)


def epoch_line(desc, epochs, history, best_from, best):
    """One line per epoch: loss, validation accuracy, the best so far, time and speed."""
    entry = history[-1]
    line = f"{desc} {entry['epoch']}/{epochs} | loss {entry['train_loss']:.4f} | val " + (
        "-" if entry["val_acc"] != entry["val_acc"] else f"{entry['val_acc']:.2f}%")
    if best_from is not None:
        line += " (still pruning)" if best is None else f" | best {history[best['epoch'] - 1]['val_acc']:.2f}%"
    return line + f" | {entry['seconds']:.1f} s ({entry['images_per_s']:.0f} img/s)"


def restore(state, model, optimizer, scheduler, after_step, device, expected, source):
    """Load a resumable state saved by fit into the run's objects -> (history, best)."""
    origin, desc, keeps_best = expected
    if state.get("source") != origin or state.get("loop") != desc or (keeps_best and "best" not in state):
        raise UserError(f"the saved state was written by another script's run, by one from another checkpoint than "
                        f"{source}, or by an older version: pass the --checkpoint it started from, or start again "
                        "without --resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if after_step is not None:  # a gradual pruner's masks, or a quantizer's codebooks, change
        after_step.load_state_dict(state["pruner"], device)
    return state["history"], state.get("best")


def load_resume(args, state_path, flags=RUN_FLAGS):
    """--resume: the saved state at `state_path`, read once, and the flags with the run's
    defining ones taken from it -> (args, state); without --resume, (args, None)."""
    if not args.resume:
        return args, None
    if not Path(state_path).is_file():
        what = "is not a file" if Path(state_path).exists() else "does not exist"
        raise UserError(f"--resume: the saved state {state_path} {what}; start the run without --resume")
    state = load_checkpoint(state_path, stages=("resume",))
    saved = {flag: state["args"][flag] for flag in flags if flag in state["args"]}
    ignored = [f"--{flag.replace('_', '-')} {value}" for flag, value in saved.items()
               if getattr(args, flag, None) != value]
    if ignored:
        print(f"--resume goes on with the run's own flags where this command's differ: {', '.join(ignored)}")
    return argparse.Namespace(**{**vars(args), **saved}), state


def main(args):
    ckpt_dir = ensure_writable(args.checkpoint_dir, ("dense.pt", "dense.resume.pt"))
    state_path = ckpt_dir / "dense.resume.pt"
    args, state = load_resume(args, state_path)
    recipe = Recipe.from_args(args)
    device = get_device(args.device, args.cudnn_benchmark)
    set_seed(recipe.seed)
    datasets, split = get_datasets(args.data_dir, args.val_size, recipe.seed, args.train_subset)
    loaders = make_loaders(datasets, recipe, device, args.eval_views)
    model = build_model(args.width).to(device, memory_format=torch.channels_last)
    if args.whiten:
        whitening_init(model.backbone.conv0, loaders["train"])
    if args.dirac:
        dirac_init(model)
    print(f"model (width {args.width}): {model_summary(model, device)}")
    print(f"data: {len(datasets['train'][0]):,} train / {len(datasets['val'][0]):,} val / "
          f"{len(datasets['test'][0]):,} test images on {device}")

    t0 = time.perf_counter()
    history, _ = fit(model, loaders, recipe, state_path=state_path, resume=state, flags=run_args(args),
                     val_every=args.val_every, compile=args.compile)
    test_acc = evaluate(model, loaders["test"])
    metrics = {"val_acc": history[-1]["val_acc"], "test_acc": test_acc, **measure(model, sparse=False),
               "train_seconds": sum(h["seconds"] for h in history),
               "wall_seconds": time.perf_counter() - t0}
    path = save_checkpoint(make_checkpoint("dense", model, metrics, args, history=history, split=split,
                                           config={"width": args.width, "num_classes": 10}), ckpt_dir / "dense.pt")
    state_path.unlink(missing_ok=True)
    print(f"test accuracy {test_acc:.2f}% ({tta_label(args.eval_views)}) | val {metrics['val_acc']:.2f}% | "
          f"train time {metrics['train_seconds']:.0f} s | saved {path}")
    return metrics


if __name__ == "__main__":
    cli(main, get_train_args_parser())
