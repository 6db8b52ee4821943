"""`vl-export bench`: a bundle's cost next to PyTorch eager, both measured in the same run, one process each."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .errors import VlExportError


def _run_side(module: str, args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VlExportError(f"benchmark of {module.rsplit('.', 1)[-1]} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def ratios(ours: dict, ref: dict) -> dict:
    """Speed-ups of ours over PyTorch (> 1 is faster); memory as ours / PyTorch."""
    out = {
        "vision_speedup": ref["vision_ms_per_tile"]["median"] / ours["vision_ms_per_tile"]["median"],
        "projector_speedup": ref["projector_ms_per_tile"]["median"] / ours["projector_ms_per_tile"]["median"],
        "peak_rss_ratio": ours["peak_rss_mib"] / ref["peak_rss_mib"],
    }
    for context, stat in ours["decode_tokens_per_s"].items():
        out[f"decode_speedup_{context}"] = stat["median"] / ref["decode_tokens_per_s"][context]["median"]
    for tiles in ours["ttft_ms"]:
        out[f"ttft_speedup_{tiles}_tiles"] = ref["ttft_ms"][tiles]["median"] / ours["ttft_ms"][tiles]["median"]
    return out


def run_bench(bundles: list[Path] | Path, reference: str | None = None, tiles: str = "1,7,13", new_tokens: int = 64,
              runs: int = 3, backends: list[str] | str = "onnxruntime", threads: int | None = None,
              backend_options: list[str] | None = None, genai: str | None = None) -> dict:
    """Time each (bundle, backend) and, with `reference`, PyTorch eager, one process each, in this one run."""
    bundles = [bundles] if isinstance(bundles, (str, Path)) else list(bundles)
    backends = [backends] if isinstance(backends, str) else list(backends)
    if len(backends) == 1:
        backends *= len(bundles)
    if len(backends) != len(bundles):
        raise VlExportError(f"{len(bundles)} bundles but {len(backends)} backends: give one, or one per bundle")
    common = ["--tiles", tiles, "--new-tokens", str(new_tokens), "--runs", str(runs)]
    if threads:
        common += ["--threads", str(threads)]
    extra = [a for option in backend_options or [] for a in ("--option", option)]
    report = {"machine": machine(), "ours": []}
    for bundle, backend in zip(bundles, backends):
        side = _run_side("vl_export.runtime.bench", ["--bundle", str(bundle), "--backend", backend, *common, *extra])
        report["ours"].append({"bundle": str(bundle), **side})
    if genai:  # onnxruntime-genai's decoder, after a prompt as long as our short text prompt
        prompt = report["ours"][0]["decode_context_tokens"]["text"]
        args = ["bench", "--model-dir", genai, "--prompt-tokens", str(prompt), "--new-tokens", str(new_tokens),
                "--runs", str(runs), *(["--threads", str(threads)] if threads else [])]
        report["genai"] = _run_side("vl_export.export.genai_peer", args)
    if reference:
        report["pytorch"] = _run_side("vl_export.export.reference_bench", ["--model", reference, *common])
        report["ratios"] = [ratios(ours, report["pytorch"]) for ours in report["ours"]]
    return report


def _fmt(stat: dict, unit: str = "") -> str:
    return f"{stat['median']:.1f}{unit} ({stat['min']:.1f}–{stat['max']:.1f})"


def _name(ours: dict) -> str:
    precision = "/".join(sorted(set(ours["precision"].values())))
    return f"{Path(ours['bundle']).name}: {ours['backend']['backend']} {precision}"


def bound_fraction(ours: dict, context: str = "text") -> float:
    """Decode speed over what reading the decoder's weights once per token at the measured bandwidth allows."""
    bound_tok_s = ours["memory_bandwidth_gb_s"] * 1e9 / ours["decoder_weight_bytes"]
    return ours["decode_tokens_per_s"][context]["median"] / bound_tok_s


def markdown(report: dict) -> str:
    """One column per bundle run (its ratio to PyTorch beside each figure), then PyTorch."""
    runs, ref = report["ours"], report.get("pytorch")
    ratio_sets = report.get("ratios") or [{} for _ in runs]
    head = "| metric | " + " | ".join(_name(o) for o in runs) + " |" + (" PyTorch eager fp32 |" if ref else "")
    rows = [head, "| --- |" + " --- |" * (len(runs) + (1 if ref else 0))]

    def row(label: str, cell, ratio_key: str | None, ref_cell=None):
        cells = []
        for ours, r in zip(runs, ratio_sets):
            text = cell(ours)
            if ref and ratio_key:
                text += f" **{r[ratio_key]:.2f}×**"
            cells.append(text)
        line = f"| {label} | " + " | ".join(cells) + " |"
        if ref:
            line += f" {(ref_cell or cell)(ref)} |"
        rows.append(line)

    row("vision per tile", lambda o: _fmt(o["vision_ms_per_tile"], " ms"), "vision_speedup")
    row("projector per tile", lambda o: _fmt(o["projector_ms_per_tile"], " ms"), "projector_speedup")
    for tiles in runs[0]["ttft_ms"]:
        row(f"time to first token, {tiles} tiles ({runs[0]['prompt_tokens'][tiles]} tokens)",
            lambda o, t=tiles: _fmt(o["ttft_ms"][t], " ms"), f"ttft_speedup_{tiles}_tiles")
    for context, tokens in runs[0]["decode_context_tokens"].items():
        after = "the short text prompt" if context == "text" else f"the {context}-tile prompt"
        row(f"decode, {runs[0]['new_tokens']} tokens after {after} ({tokens} tokens)",
            lambda o, c=context: _fmt(o["decode_tokens_per_s"][c], " tok/s"), f"decode_speedup_{context}")
    row("decode after the short prompt / weights-read bound", lambda o: f"{bound_fraction(o):.0%}", None,
        lambda o: "")
    row("peak RSS", lambda o: f"{o['peak_rss_mib']:.0f} MiB", "peak_rss_ratio")
    row("model bytes", lambda o: f"{o['model_bytes'] / 2**20:.0f} MiB", None)
    genai = report.get("genai")
    if genai:
        ratio = ", ".join(f"{o['decode_tokens_per_s']['text']['median'] / genai['decode_tokens_per_s']['median']:.2f}×"
                          for o in runs)
        rows.append(f"\nonnxruntime-genai {genai['version']} (its INT4 builder), same run, decode after a "
                    f"{genai['prompt_tokens']}-token prompt: {_fmt(genai['decode_tokens_per_s'], ' tok/s')}, "
                    f"peak RSS {genai['peak_rss_mib']:.0f} MiB; ours / genai after the short prompt: {ratio}.")
    bandwidth = ", ".join(f"{o['memory_bandwidth_gb_s']:.1f}" for o in runs)
    rows.append(f"\nMemory bandwidth (STREAM-like triad, same threads) measured per side: {bandwidth} GB/s; "
                f"the bound is that bandwidth / the decoder graph's bytes (weights read once per token).")
    m = report["machine"]
    note = " Bold: speed-up over PyTorch (memory: ours / PyTorch)." if ref else ""
    footer = f"\nMedian (min–max) after a warm-up; {m['cpu']}, {m['cores']} cores, {m['date']}.{note}"
    return "\n".join(rows) + footer
