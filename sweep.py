"""A sweep's records, frontier.json: its methods, reading and checking the file, the lock that
keeps a second sweep off it, the plan of the runs still to do, and the table of mean +- std
over seeds. frontier.py runs the plan."""
import contextlib
import fcntl
import statistics
import sys

from checkpoint import read_json
from cli import is_fraction, is_number
from export import read_export
from utils import TTA_VIEWS, UserError, format_table, tta_label

ALLOCATIONS = ("uniform", "global", "scan", "random")
BELOW = "below"  # a chain's run that starts from the run before it
METHODS = (*ALLOCATIONS, "uniform-gradual", "global-gradual", "scan-gradual",
           "uniform-iterative", "global-iterative", "scan-iterative")


def split_method(method):
    """'global-iterative' -> ('global', 'iterative'); 'uniform' -> ('uniform', 'one-shot')."""
    allocation, _, kind = method.partition("-")
    return allocation, kind or "one-shot"


def run_label(run):
    """(method, target, seed) -> 'global 0.9 seed 0', as every line about a run names it."""
    method, target, seed = run
    return f"{method} {target:g} seed {seed}"


def export_name(run, bits=0):
    """(method, target, seed) -> the file name of its fp32 export, or of its bits-wide shared one."""
    method, target, seed = run
    return f"{method}-{target:g}-seed{seed}" + (f"-{bits}bit" if bits else "") + ".sparse.pt"


def run_key(record):
    """A record's (method, target, seed): what a rerun skips by."""
    return record["method"], record["target"], record["seed"]


NUMBERS = ("target", "seed", "sparsity", "val_acc", "test_acc", "size_bits", "macs", "export_bytes",
           "finetune_epochs")  # of a record


QUANTIZED_NUMBERS = ("val_acc", "test_acc", "export_bytes")


def is_point(p, bits):
    """Whether `p` is a record frontier.py writes with this --bits (the numbers it reads back
    are numbers)."""
    if not (isinstance(p, dict) and p.get("method") in METHODS and all(is_number(p.get(k)) for k in NUMBERS)
            and is_fraction(p["target"]) and isinstance(p["seed"], int) and p["seed"] >= 0):
        return False
    q = p.get("quantized")
    return not bits or (isinstance(q, dict) and all(is_number(q.get(k)) for k in QUANTIZED_NUMBERS))


def load_sweep(path, dense_record, budget):
    """The runs already in frontier.json; a file from another dense model or budget is refused."""
    if not path.exists():
        return []
    fix = "pass another --out, or delete it to start over"
    sweep = read_json(path, "a sweep written by frontier.py", fix)
    if not isinstance(sweep, dict) or not isinstance(sweep.get("points"), list) or not isinstance(
            sweep.get("budget"), dict) or not all(is_point(p, sweep["budget"].get("bits")) for p in sweep["points"]):
        raise UserError(f"{path} is not a sweep written by this version of frontier.py: {fix}")
    if len({run_key(p) for p in sweep["points"]}) != len(sweep["points"]):
        raise UserError(f"{path} holds a run twice (method, target and seed): {fix}")
    if sweep.get("dense") != dense_record or {"eval_views": TTA_VIEWS, **sweep["budget"]} != budget:  # older files: 4
        raise UserError(f"{path} holds a sweep of another dense model or budget: {fix}")
    return sweep["points"]


@contextlib.contextmanager
def lock_sweep(out):
    """Hold the OS's exclusive lock on OUT's lock file (.NAME.lock beside it, left there), so
    that a second sweep on the same file is refused, not left to overwrite the first one's
    runs; the kernel drops the lock of a killed process. Where the file system has no locks,
    a warning says so and the sweep runs."""
    lock_path = out.with_name(f".{out.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out} is being written by another frontier.py right now: wait for it to end (rerunning "
                            "then continues the sweep), or pass another --out") from None
        except OSError as e:  # a file system without locks (some NFS or Lustre mounts): run unguarded
            print(f"warning: cannot lock {lock_path} ({e.strerror}); run one sweep at a time on {out.name}",
                  file=sys.stderr)
        yield


def summarize(points):
    """One row per (method, target): the number of runs and the mean and sample std
    (NaN for one run) of each figure -> list of dicts, by target then method."""
    def stats(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")

    groups = {}
    for p in points:
        groups.setdefault((p["method"], p["target"]), []).append(p)
    rows = []
    for (method, target), runs in sorted(groups.items(), key=lambda g: (g[0][1], METHODS.index(g[0][0]))):
        row = {"method": method, "target": target, "n": len(runs)}
        for key in ("sparsity", "val_acc", "test_acc", "export_bytes", "macs", "finetune_epochs"):
            row[key], row[key + "_std"] = stats([p[key] for p in runs])
        if all("quantized" in p for p in runs):
            for key in ("test_acc", "export_bytes"):
                row["q_" + key], row["q_" + key + "_std"] = stats([p["quantized"][key] for p in runs])
        rows.append(row)
    return rows


def print_table(sweep):
    dense, bits = sweep["dense"], sweep["budget"]["bits"]

    def pm(mean, std):
        return f"{mean:.2f}" + ("" if std != std else f" +- {std:.2f}")

    rows = []
    for r in summarize(sweep["points"]):
        row = [r["method"], f"{r['target']:g}", r["n"], f"{r['sparsity']:.4f}", f"{r['finetune_epochs']:g}",
               pm(r["test_acc"], r["test_acc_std"]), f"{r['test_acc'] - dense['test_acc']:+.2f}",
               f"{dense['checkpoint_bytes'] / r['export_bytes']:.1f}x"]
        if bits:
            q = "q_test_acc" in r
            row += [pm(r["q_test_acc"], r["q_test_acc_std"]) if q else "-",
                    f"{r['q_test_acc'] - dense['test_acc']:+.2f}" if q else "-",
                    f"{r['q_export_bytes']:,.0f}" if q else "-",
                    f"{dense['checkpoint_bytes'] / r['q_export_bytes']:.1f}x" if q else "-"]
        rows.append(row + [f"{r['macs'] / 1e6:,.1f}"])
    headers = ["method", "target", "runs", "sparsity", "epochs", "test %", "vs dense", "fp32 on disk"]
    if bits:
        headers += [f"{bits}-bit test %", "vs dense", "bytes", "on disk"]
    print(format_table(rows, headers + ["MACs (M)"]))
    print(f"dense: test {dense['test_acc']:.2f}% | val {dense['val_acc']:.2f}% | dense.pt "
          f"{dense['checkpoint_bytes']:,} bytes | {dense['macs'] / 1e6:,.1f} M MACs. test %: mean +- sample std "
          f"over the runs (seeds), {tta_label(sweep['budget']['eval_views'])}; epochs: finetuning epochs since dense; "
          "on disk: dense.pt's bytes over the export's")


def plan_chains(methods, targets, seeds, points):
    """The runs still to do, as chains to run in order: an iterative method's targets for
    one seed form one chain, each run starting from the run below it, a finished one or
    the one before it in the chain (None: the dense model); any other run is a chain of its
    own. -> [[(run, start)]], start None, a finished run's record, or BELOW."""
    done = {run_key(p): p for p in points}
    chains = []
    for method in methods:
        for seed in seeds:
            if split_method(method)[1] != "iterative":
                continue
            chain, below = [], sorted(t for m, t, s in done if m == method and s == seed)
            for target in sorted(targets):
                if (method, target, seed) in done:
                    continue
                lower = (method, max(t for t in below if t < target), seed) if below and below[0] < target else None
                chain.append(((method, target, seed), done[lower] if lower in done else lower and BELOW))
                below = sorted({*below, target})
            if chain:
                chains.append(chain)
    return chains + [[((m, t, s), None)] for s in seeds for m in methods for t in targets  # in the order asked
                     if split_method(m)[1] != "iterative" and (m, t, s) not in done]


def load_starts(chains, folder, config):
    """`chains` with each finished run that an iterative run goes on from replaced by (its
    record, {its export's name: bytes}); that export must be there, whole: refused now
    rather than after hours of training."""
    fix = "restore the file, or delete that run's record from the sweep file"
    loaded = []
    for chain in chains:
        loaded.append([])
        for run, start in chain:
            if isinstance(start, dict):
                path, what = folder / export_name(run_key(start)), run_label(run)
                if not path.is_file():
                    raise UserError(f"{path} is missing, but {what} goes on from it: {fix}")
                try:
                    header, _ = read_export(path)
                except UserError as e:
                    raise UserError(f"{e}; {what} would go on from it: {fix}") from None
                if header["config"] != config or path.stat().st_size != start["export_bytes"] or header["values"] != "float32":
                    raise UserError(f"{path} is not the export its record in the sweep file describes, but {what} "
                                    f"goes on from it: {fix}")
                start = start, {path.name: path.read_bytes()}
            loaded[-1].append((run, start))
    return loaded
