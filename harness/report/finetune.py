"""The finetune scenario in the report: a training table per model, a frontier of peak memory against
step time, and which precision to fine-tune in within the memory given."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.records import TRAIN_PHASES
from harness.report.formats import Block, Bullets, Heading, Image, Text
from harness.report.pareto import FRONTIER_GROUP, pareto_mask
from harness.report.tables import Table, num
from harness.units import MIB, human_bytes

# frontier objectives: both lower is better (harness.records metrics train_peak_bytes, train_step_s)
OBJECTIVES = {"train_peak_bytes": "min", "train_step_s": "min"}
ROUNDTRIP_KL_OK = 1e-3  # an adapter whose reload on a fresh base moves the logits more than this is not faithful


def training_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The finetune scenario's rows, with the measured peak of each phase above the pre-load baseline
    (host) or the allocator's (cuda), the plan's error per phase, and the frontier flag."""
    rows = frame[frame["scenario"] == "finetune"].copy()
    if rows.empty:
        return rows
    num_ = lambda c: pd.to_numeric(rows[c], errors="coerce")  # noqa: E731
    host = rows["device"] == "cpu"
    for phase in TRAIN_PHASES:
        measured = (num_(f"peak_rss_{phase}_bytes") - num_("rss_before_load_bytes")).where(
            host, num_(f"peak_device_allocated_{phase}_bytes")
        )
        rows[f"measured_{phase}_bytes"] = measured
        rows[f"plan_err_{phase}"] = num_(f"predicted_{phase}_bytes") / measured - 1
    rows["planned_peak_bytes"] = (
        rows[[f"predicted_{p}_bytes" for p in TRAIN_PHASES]].apply(pd.to_numeric, errors="coerce").max(axis=1)
    )
    rows["on_train_frontier"] = False
    ok = rows[rows["status"] == "ok"]
    for _, group in ok.groupby(FRONTIER_GROUP, sort=False):
        rows.loc[group.index, "on_train_frontier"] = pareto_mask(group, OBJECTIVES)
    return rows


def _pct(value: object) -> str:
    return "-" if pd.isna(value) else f"{100 * float(value):+.0f}%"


def _phase_cell(row: pd.Series, phase: str) -> str:
    measured = row[f"measured_{phase}_bytes"]
    if pd.isna(measured):
        return "-"
    return f"{measured / MIB:.0f} ({_pct(row[f'plan_err_{phase}'])})"


def _step(row: pd.Series) -> str:
    if pd.isna(row["train_step_s"]):
        return "-"
    ci = row["train_step_s_ci_rel"]
    return num(row["train_step_s"]) + ("" if pd.isna(ci) else f" ±{100 * float(ci):.0f}%")


def _fits(row: pd.Series, budget_bytes: int | None) -> str:
    limit = budget_bytes or row.get("device_memory_bytes")
    planned = row["planned_peak_bytes"]
    if pd.isna(planned) or not limit or pd.isna(limit):
        return "-"
    return ("yes" if planned <= limit else "no") + f" ({human_bytes(planned)} of {human_bytes(limit)})"


def _outcome(row: pd.Series) -> str:
    if row["status"] == "ok":
        return "ok" + (" (frontier)" if row["on_train_frontier"] else "")
    reason = row["error"] if row["status"] == "failed" else row["skip_reason"]
    return f"{row['status']}: {str(reason)[:70]}"


def finetune_table(rows: pd.DataFrame, budget_bytes: int | None) -> Table:
    """One model's training rows on one device and hardware."""
    first = rows.iloc[0]
    headers = ["precision", "method", "fits (plan)", "forward MiB (plan err)", "backward MiB (plan err)",
               "optimizer MiB (plan err)", "step s ±CI", "train tok/s", "loss first -> last", "adapter KL",
               "merged KL", "outcome"]  # fmt: skip
    body = []
    for _, r in rows.sort_values(["precision_rank", "lora_rank"]).iterrows():
        rank = "" if pd.isna(r["lora_rank"]) else (" full" if r["lora_rank"] == 0 else f" r{int(r['lora_rank'])}")
        losses = "-" if pd.isna(r["loss_first"]) else f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        body.append([
            str(r["precision"]), f"{r['lora_method'] if isinstance(r['lora_method'], str) else '-'}{rank}",
            _fits(r, budget_bytes), *(_phase_cell(r, p) for p in TRAIN_PHASES), _step(r), num(r["train_tok_s"]),
            losses, num(r["adapter_roundtrip_kl"]), num(r["merged_kl"]), _outcome(r),
        ])  # fmt: skip
    title = f"{first['model']} on {first['device']} ({first['hardware']})"
    return Table(title, headers, body)


def recommend_finetune(rows: pd.DataFrame, budget_bytes: int | None) -> list[str]:
    """Per model, device and hardware: the fastest precision whose training fits, learns, and whose
    adapter reloads faithfully; and where QLoRA needs more memory than 16-bit LoRA, say so."""
    sentences = []
    for _, group in rows.groupby(FRONTIER_GROUP, sort=True):
        first = group.iloc[0]
        where = f"{first['model']} on {first['device']} ({first['hardware']})"
        limit = budget_bytes or first.get("device_memory_bytes")
        ok = group[group["status"] == "ok"]
        good = ok[(pd.to_numeric(ok["loss_drop_frac"], errors="coerce") > 0)
                  & ~(pd.to_numeric(ok["adapter_roundtrip_kl"], errors="coerce") > ROUNDTRIP_KL_OK)]  # fmt: skip
        fits = good[pd.to_numeric(good["train_peak_bytes"], errors="coerce") <= limit] if limit else good
        if ok.empty:
            reasons = sorted({str(r) for r in group["skip_reason"].fillna(group["error"]).dropna()})
            sentences.append(f"{where}: no training row ran ({'; '.join(reasons)[:200]})")
            continue
        if fits.empty:
            sentences.append(f"{where}: no precision learned with a faithful adapter within {human_bytes(limit)}")
            continue
        best = fits.loc[pd.to_numeric(fits["train_step_s"], errors="coerce").idxmin()]
        smallest = fits.loc[pd.to_numeric(fits["train_peak_bytes"], errors="coerce").idxmin()]
        text = (
            f"{where}: fine-tune in {best['precision']} ({best['lora_method']}): {num(best['train_step_s'])} s per "
            f"step, {human_bytes(best['train_peak_bytes'])} at its peak"
            + (f" within {human_bytes(limit)}" if limit else "")
        )
        if smallest["precision"] != best["precision"]:
            text += f"; the least memory: {smallest['precision']} ({human_bytes(smallest['train_peak_bytes'])})"
        kbit = ok[ok["lora_method"] == "kbit"]
        plain16 = ok[(ok["lora_method"] == "plain") & ok["precision"].isin(["bf16", "fp16"])]
        if not kbit.empty and not plain16.empty:
            qlora, lora = kbit.loc[kbit["train_peak_bytes"].idxmin()], plain16.loc[plain16["train_peak_bytes"].idxmin()]
            if qlora["train_peak_bytes"] > lora["train_peak_bytes"]:
                text += (
                    f"; QLoRA ({qlora['precision']}) peaks higher than {lora['precision']} LoRA "
                    f"({human_bytes(qlora['train_peak_bytes'])} vs {human_bytes(lora['train_peak_bytes'])}): "
                    f"kbit preparation casts {human_bytes(qlora['upcast_param_bytes'])} of 16-bit weights to fp32"
                )
        sentences.append(text)
    return sentences


def plot_finetune_frontier(rows: pd.DataFrame, path: Path) -> Path | None:
    """Peak training memory against step time per model and device, the frontier as a line."""
    from harness.report.plots import _figure, _title

    ok = rows[(rows["status"] == "ok") & rows["train_peak_bytes"].notna() & rows["train_step_s"].notna()]
    groups = [g for _, g in ok.groupby(FRONTIER_GROUP, sort=True)]
    if not groups:
        return None
    fig, axes = _figure(len(groups))
    for ax, group in zip(axes, groups, strict=True):
        for method, marker in (("plain", "o"), ("kbit", "s"), ("full", "D")):
            points = group[group["lora_method"] == method]
            if points.empty:
                continue
            ax.scatter(points["train_step_s"], points["train_peak_bytes"] / MIB, marker=marker, label=method)
        for _, r in group.iterrows():
            ax.annotate(str(r["precision"]), (r["train_step_s"], r["train_peak_bytes"] / MIB), fontsize=7)
        front = group[group["on_train_frontier"]].sort_values("train_step_s")
        ax.plot(front["train_step_s"], front["train_peak_bytes"] / MIB, color="red", linewidth=1)
        ax.set_xlabel("step s (median)")
        ax.set_ylabel("training peak MiB")
        ax.set_title(_title(group), fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def finetune_section(frame: pd.DataFrame, out: Path, budget_bytes: int | None) -> list[Block]:
    """The report's fine-tuning section, or nothing when no run measured the finetune scenario."""
    rows = training_rows(frame)
    if rows.empty:
        return []
    blocks: list[Block] = [
        Heading("Fine-tuning"),
        Text(
            "One LoRA/QLoRA (or full, rank 0) training run per combination on one fixed batch. Memory is each "
            "phase's peak above the worker's pre-load baseline (host RSS on cpu, the allocator on cuda), with the "
            "training plan's error beside it (plan / measured - 1). Step time is the median over the steps after "
            "the warm-up, with its 95 % CI. Adapter KL compares the trained model with its adapter reloaded on a "
            "fresh base; merged KL with the adapter merged into the weights."
        ),
        Bullets(recommend_finetune(rows, budget_bytes)),
    ]
    for _, group in rows.groupby(FRONTIER_GROUP, sort=True):
        blocks.append(finetune_table(group, budget_bytes))
    image = plot_finetune_frontier(rows, out / "finetune_frontier.png")
    if image is not None:
        blocks.append(Image(image, "training peak memory against step time, frontier in red"))
    return blocks
