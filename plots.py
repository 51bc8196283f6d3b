"""Every figure the scripts draw, each saved atomically as a PNG."""
import math
from pathlib import Path

from checkpoint import atomic_write
from utils import MiB, get_sparsity, plural, short_name


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots are files, no window is opened."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Save a matplotlib figure atomically (tight, 120 dpi; the format from the suffix) and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=120,
                                                        bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_weights(model, path, bins=256):
    """Histograms of each prunable tensor's nonzero weights (one panel per layer)."""
    plt = pyplot()
    params = {n: p for n, p in model.named_parameters() if p.dim() > 1}  # the prunable tensors
    names = list(params)
    cols = 6
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(3 * cols, 2.4 * math.ceil(len(names) / cols)))
    for ax, name in zip(axes.flat, names):
        w = params[name].detach().float().flatten().cpu()
        ax.hist(w[w != 0].numpy(), bins=bins, color="tab:blue", alpha=0.8)
        ax.set_title(f"{short_name(name)}\n"
                     f"sparsity {get_sparsity(w):.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Distribution of the remaining (nonzero) weights per layer")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_summary(stages, path):
    """Two bar panels, size (MiB) and test accuracy (%), for dense / pruned / finetuned
    (the stages given)."""
    plt = pyplot()
    names = list(stages)
    colors = [{"dense": "tab:gray", "pruned": "tab:orange"}.get(n, "tab:green") for n in names]
    fig, (ax_size, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label, fmt in ((ax_size, "size_mib", "model size (MiB)", "{:.2f}"),
                                (ax_acc, "test_acc", "test accuracy (%)", "{:.2f}%")):
        values = [stages[n][key] for n in names]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
        ax.set_ylabel(label)
        ax.margins(y=0.15)
    low = min(stages[n]["test_acc"] for n in names)
    ax_acc.set_ylim(max(0, low - 10), 100)
    fig.suptitle(" vs ".join(names))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sensitivity(result, suggestion, path):
    """One panel per layer: accuracy against sparsity, the dense accuracy and the allowed drop."""
    plt = pyplot()
    dense, drop, sparsities = result["dense_acc"], result["max_drop"], result["sparsities"]
    names = list(result["accuracy"])
    cols = 6
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        accs = result["accuracy"][name]
        ok = [dense - a <= drop for a in accs]
        ax.plot(sparsities, accs, color="0.3", lw=1.2, zorder=1)
        ax.scatter(sparsities, accs, c=["tab:green" if o else "tab:red" for o in ok], s=18, zorder=2)
        ax.axhline(dense, color="tab:blue", ls="--", lw=1, label=f"dense {dense:.1f}%")
        ax.axhline(dense - drop, color="tab:red", ls=":", lw=1, label=f"allowed drop {drop:.2f}")
        if suggestion[name] > 0:
            ax.axvline(suggestion[name], color="tab:green", lw=0.8, alpha=0.6)
        low = min(min(accs), dense - 2 * drop)
        ax.set_ylim(max(0, low - 0.1 * (dense - low) - 0.5), min(100, dense + 0.15 * (dense - low) + 0.5))
        ax.set_title(f"{short_name(name)} "
                     f"({result['num_parameters'][name]:,})\nsuggested {suggestion[name]:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("sparsity", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)", fontsize=8)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Sensitivity scan on the {result['split']} split ({result['num_images']:,} images): "
                 "green points stay within the allowed drop")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_parameters(num_parameters, path):
    """Horizontal bars: parameter count per prunable layer."""
    plt = pyplot()
    names = [short_name(n) for n in num_parameters]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1))
    ax.barh(names[::-1], list(num_parameters.values())[::-1], color="tab:blue")
    for i, v in enumerate(list(num_parameters.values())[::-1]):
        ax.text(v, i, f" {v:,}", va="center", fontsize=7)
    ax.set_xlabel("parameters")
    ax.set_title("Parameters per prunable layer: where pruning saves the most")
    ax.margins(x=0.15)
    fig.tight_layout()
    return save_figure(fig, path)


def log_ticks(ax, values, candidates, labels):
    """A log x axis with those `candidates` as ticks that fall within reach of `values`."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ticks = [t for t in candidates if 0.8 * min(values) <= t <= 1.25 * max(values)]
    ax.set_xticks(ticks, [labels.format(t) for t in ticks])


def plot_frontier(sweep, rows, path):
    """Test accuracy (mean +- std over seeds: the sweep's summarized `rows`) against the
    compression on disk, fp32 export (solid) and weight-shared export (dotted) (left), and
    against MACs on nonzero weights (right); a colour per method, in the order the rows
    first name them, the dense accuracy and its 0.5-point band."""
    plt = pyplot()
    dense, bits, b = sweep["dense"], sweep["budget"]["bits"], sweep["budget"]
    fig, (ax_size, ax_macs) = plt.subplots(1, 2, figsize=(14, 5.6), sharey=True)
    shown = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(shown):
        mine = [r for r in rows if r["method"] == method]
        runs = sorted({r["n"] for r in mine})
        n = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
        style = {"color": f"C{i % 10}", "capsize": 3, "lw": 1.5}
        err = [0 if r["n"] < 2 else r["test_acc_std"] for r in mine]
        ax_size.errorbar([dense["checkpoint_bytes"] / r["export_bytes"] for r in mine], [r["test_acc"] for r in mine],
                         yerr=err, marker="o", label=f"{method} (n={n})", **style)
        ax_macs.errorbar([r["macs"] / 1e6 for r in mine], [r["test_acc"] for r in mine], yerr=err, marker="o",
                         label=method, **style)
        if bits:
            q = [r for r in mine if "q_test_acc" in r]
            ax_size.errorbar([dense["checkpoint_bytes"] / r["q_export_bytes"] for r in q], [r["q_test_acc"] for r in q],
                             yerr=[0 if r["n"] < 2 else r["q_test_acc_std"] for r in q], marker="s", ls=":",
                             **style)
    for ax in (ax_size, ax_macs):
        ax.axhline(dense["test_acc"], color="k", lw=1, label=f"dense {dense['test_acc']:.2f}%")
        ax.axhspan(dense["test_acc"] - 0.5, dense["test_acc"], color="k", alpha=0.08, label="within 0.5 points")
        ax.grid(alpha=0.3)
    accs = [r["test_acc"] for r in rows] + [r["q_test_acc"] for r in rows if "q_test_acc" in r]
    ax_size.set_ylim(max(min(accs) - 1, dense["test_acc"] - 20), dense["test_acc"] + 1)
    ratios = [dense["checkpoint_bytes"] / r[k] for r in rows for k in ("export_bytes", "q_export_bytes") if k in r]
    log_ticks(ax_size, ratios, (2, 3, 5, 10, 20, 30, 50, 100, 150, 200, 300, 500), "{}x")
    shared = f"; dotted: {bits}-bit weight sharing" if bits else ""
    ax_size.set_xlabel(f"smaller on disk than dense.pt ({dense['checkpoint_bytes'] / MiB:.2f} MiB); "
                       f"solid: fp32 export{shared}")
    ax_size.set_ylabel("test accuracy (%), mean +- std over seeds")
    ax_size.legend(fontsize=8, loc="lower left")
    log_ticks(ax_macs, [r["macs"] / 1e6 for r in rows], (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), "{:,}")
    ax_macs.set_xlabel(f"MACs per image on nonzero weights (M; dense {dense['macs'] / 1e6:,.0f} M), fp32 models")
    quantized = f"; then {bits}-bit sharing, {plural(b['quantize_epochs'], 'codebook epoch')}" if bits else ""
    fig.suptitle(f"Pruning width {dense['width']:g}: every run finetuned {plural(b['epochs'], 'epoch')} on "
                 f"{b['train_subset'] or 'all'} training images (lr {b['lr']:g}, batch {b['batch_size']}){quantized}")
    fig.tight_layout()
    return save_figure(fig, path)
