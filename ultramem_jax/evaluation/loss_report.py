"""The report of ``eval.py loss``: markdown tables, the loss-by-position
plot, and the files they are written to."""

from __future__ import annotations

import json
import pathlib

from ultramem_jax.evaluation.plots import line_plot

_MD_NOTE_BEYOND = ("positions at or beyond the trained sequence length ({seq_len}) "
                   "were never trained on: rotary positions are extrapolated, "
                   "not clipped")


def _fmt_positions(start: int, end: int) -> str:
  return str(start) if end == start + 1 else f"{start}-{end - 1}"


def _corpus_table(result: dict) -> list[str]:
  lines = [f"Checkpoint `{result['checkpoint']}` (trained on "
           f"`{result['trained_source']}`, seq_len {result['seq_len']}).", "",
           "| corpus | documents | tokens | loss (nats/token) | perplexity | "
           "unigram entropy |", "|---|---|---|---|---|---|"]
  for name, c in result["corpora"].items():
    lines.append(f"| {name} | {c['documents']} | {c['tokens']} | {c['loss']:.4f} | "
                 f"{c['perplexity']:.2f} | {c['unigram_entropy']:.4f} |")
  lines.append("")
  for name, c in result["corpora"].items():
    lines.append(f"- {name}: {c['selection']}"
                 + (" (the run's training source)" if c["trained_on"] else ""))
  return lines


def _position_table(p: dict) -> list[str]:
  names = list(p["corpora"])
  lines = ["", f"Loss by position (nats/token), context {p['context']}, "
           f"buckets {p['buckets']}; tokens per bucket in parentheses.", "",
           "| positions | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  per = [p["corpora"][n]["buckets"] for n in names]
  for i, b in enumerate(per[0]):
    cells = [f"{bs[i]['loss']:.4f} ({bs[i]['tokens']})" for bs in per]
    lines.append(f"| {_fmt_positions(b['start'], b['end'])} | " + " | ".join(cells) + " |")
  for key, label in (("early_loss", "early {0}-{1}"), ("late_loss", "late {0}-{1}")):
    span = p["corpora"][names[0]][key.replace("loss", "positions")]
    cells = [f"{p['corpora'][n][key]:.4f}" for n in names]
    lines.append(f"| {label.format(span[0], span[1] - 1)} | " + " | ".join(cells) + " |")
  cells = [f"{p['corpora'][n]['late_minus_early']:+.4f}" for n in names]
  lines.append("| late - early | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Documents (at least context tokens / shorter, left out): " + ", ".join(
      f"{n} {p['corpora'][n]['documents']} / {p['corpora'][n]['documents_too_short']}"
      for n in names) + ".")
  if p["beyond_trained_length"]:
    lines.append("Note: " + _MD_NOTE_BEYOND.format(seq_len=p["trained_seq_len"]) + ".")
  return lines


def markdown(result: dict) -> str:
  """The report as markdown tables."""
  lines = _corpus_table(result)
  for reason in result.get("positions_skipped", {}).values():
    lines += ["", f"No loss by position: {reason}."]
  if result.get("positions"):
    lines += _position_table(result["positions"])
  return "\n".join(lines) + "\n"


def plot_positions(result: dict, path: pathlib.Path) -> pathlib.Path:
  """Mean loss per bucket against the bucket's middle position."""
  p = result["positions"]
  series = {}
  for name, c in p["corpora"].items():
    xs = [(b["start"] + b["end"] - 1) / 2 for b in c["buckets"]]
    series[name] = (xs, [b["loss"] for b in c["buckets"]])
  vlines = ({f"trained length ({p['trained_seq_len']})": p["trained_seq_len"]}
            if p["beyond_trained_length"] else None)
  return line_plot(
      path, series, xlabel="position in document (tokens before the target)",
      ylabel="loss (nats/token)", vlines=vlines,
      xscale="symlog" if p["buckets"] == "pow2" else "linear",
      title=f"Loss by position, step {result['step']}")


def write_report(out: pathlib.Path, result: dict) -> list[pathlib.Path]:
  """Writes loss_step<N>.json and .md (and the position plot) under `out`."""
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"loss_step{result['step']}"
  written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
  written[0].write_text(json.dumps(result, indent=2) + "\n")
  written[1].write_text(markdown(result))
  if "positions" in result:
    written.append(plot_positions(result, out / f"loss_by_position_step{result['step']}.png"))
  return written
