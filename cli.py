"""The command line every script shares: flag types checked when parsed, the common
flags, and `cli`, which turns a user error into one line on stderr and a non-zero exit."""
import argparse
import math
import os
import signal
import sys

from utils import TTA_VIEWS, Interrupted, UserError, plural

DEFAULT_DATA_DIR = "data/cifar10"


def _number(kind, text, ok, allowed):
    """argparse type helper: parse `text` as `kind`, refuse it unless ok(value)."""
    try:
        value = kind(text)
        if not (math.isfinite(value) and ok(value)):
            raise ValueError
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    return value


def positive_int(text):
    return _number(int, text, lambda v: v >= 1, "an integer of 1 or more")


def nonnegative_int(text):
    return _number(int, text, lambda v: v >= 0, "an integer of 0 or more")


def seed_int(text):
    return _number(int, text, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")


def positive_float(text):
    return _number(float, text, lambda v: v > 0, "a finite number above 0")


def nonnegative_float(text):
    return _number(float, text, lambda v: v >= 0, "a finite number of 0 or more")


MAX_WIDTH = 8  # already a 1.3-billion-parameter model


def width(text):
    """The channel multiplier, in (0, MAX_WIDTH]."""
    return _number(float, text, lambda v: 0 < v <= MAX_WIDTH, f"a number above 0 and at most {MAX_WIDTH}")


def fraction_in(low_open, high_open):
    """An argparse type for a fraction in [0, 1], either end open when asked."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text):
        return _number(float, text, lambda v: (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1),
                       f"a fraction in {left}0, 1{right}")
    return parse


def is_fraction(value):
    """True for a real number (not a bool) in [0, 1], such as a sparsity."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


def is_number(value):
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


fraction = fraction_in(False, False)  # a number in [0, 1], such as a sparsity


def comma_list(parse, what):
    """An argparse type: comma-separated values of `parse`'s kind ('0.9,0.5,0.9' ->
    (0.5, 0.9)), sorted, each once."""
    def parse_list(text):
        try:
            values = tuple(parse(v.strip()) for v in text.split(",") if v.strip())
        except argparse.ArgumentTypeError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")
        return tuple(sorted(set(values)))
    return parse_list


fraction_list = comma_list(fraction, "fractions in [0, 1]")
seed_list = comma_list(seed_int, "seeds (integers from 0)")


def int_in(low, high):
    """An argparse type for an integer in [low, high]."""
    def parse(text):
        return _number(int, text, lambda v: low <= v <= high, f"an integer from {low} to {high}")
    return parse


def cli(main, parser, argv=None):
    """Run `main(parser.parse_args(argv))`; a UserError ends as one line on stderr and
    a non-zero exit, never as a traceback; so does a flag that fails its parse-time check."""
    def one_line(message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line  # argparse's own would print the whole usage text first
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, terminate_as_interrupt)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the run did not finish: run it again (an output it had already replaced may not "
              "match the others until then)", file=sys.stderr)
        sys.exit(Interrupted.exit_code)
    except UserError as e:
        prefix = "\ninterrupted" if isinstance(e, Interrupted) else "error"
        print(f"{prefix}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # a read or write that no check could foresee: an I/O error, a vanished file
        print(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def terminate_as_interrupt(signum, frame):
    """SIGTERM (a batch scheduler's or `timeout`'s stop, a preemption) ends a run as Ctrl-C
    does, with its exit code 130: each training loop names its last saved state, and --resume
    goes on from it. A second SIGTERM ends the process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def add_common_args(parser, plots=False, checkpoints=True):
    """The flags every script shares: where data, checkpoints and plots live, and the device."""
    add = parser.add_argument
    add("--data-dir", default=DEFAULT_DATA_DIR,
        help="CIFAR-10 folder: cifar-10-batches-py, train/<class>/ image folders, or empty "
             "to download into (default: %(default)s)")
    if checkpoints:
        add("--checkpoint-dir", default="checkpoints",
            help="where checkpoints are read and written (default: %(default)s)")
    if plots:
        add("--plot-dir", default="plots", help="where plots go (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    add("--eval-views", type=int_in(1, TTA_VIEWS), default=TTA_VIEWS, metavar="N",
        help="test-time augmentation views per evaluated image, 1 to 4: one forward pass each, so "
             "at 4 evaluating an image costs more than a training step on it (3 passes); 1 makes "
             "quick tries quick. Compare accuracies only at equal views (default: %(default)s)")
    return parser


def run_args(args):
    """The flags of a run, as a plain dict for checkpoints."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def resolve_jobs(jobs, auto):
    """--jobs N: runs at once, 0 meaning `auto`. Each needs a CPU core of its own (on
    CUDA too, to drive the GPU): more is refused rather than left to thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if jobs > cores:
        raise UserError(f"--jobs {jobs} is more than the {plural(cores, 'CPU core')} this process may use: "
                        f"pass at most {cores}")
    return jobs or max(1, min(auto, cores))
