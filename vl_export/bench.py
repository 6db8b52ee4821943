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
        "decode_speedup": ours["decode_tokens_per_s"]["median"] / ref["decode_tokens_per_s"]["median"],
        "peak_rss_ratio": ours["peak_rss_mib"] / ref["peak_rss_mib"],
    }
    for tiles in ours["ttft_ms"]:
        out[f"ttft_speedup_{tiles}_tiles"] = ref["ttft_ms"][tiles]["median"] / ours["ttft_ms"][tiles]["median"]
    return out


def run_bench(bundle: Path, reference: str | None = None, tiles: str = "1,7,13", new_tokens: int = 64, runs: int = 3,
              backend: str = "onnxruntime", threads: int | None = None, backend_options: list[str] | None = None) -> dict:
    common = ["--tiles", tiles, "--new-tokens", str(new_tokens), "--runs", str(runs)]
    if threads:
        common += ["--threads", str(threads)]
    extra = [a for option in backend_options or [] for a in ("--option", option)]
    report = {"machine": machine(), "bundle": str(bundle),
              "ours": _run_side("vl_export.runtime.bench", ["--bundle", str(bundle), "--backend", backend, *common, *extra])}
    if reference:
        report["pytorch"] = _run_side("vl_export.export.reference_bench", ["--model", reference, *common])
        report["ratios"] = ratios(report["ours"], report["pytorch"])
    return report


def _fmt(stat: dict, unit: str = "") -> str:
    return f"{stat['median']:.1f}{unit} ({stat['min']:.1f}–{stat['max']:.1f})"


def markdown(report: dict) -> str:
    ours, ref, r = report["ours"], report.get("pytorch"), report.get("ratios", {})
    name = f"{ours['backend']['backend']} ({'/'.join(sorted(set(ours['precision'].values())))})"
    head = f"| metric | {name} |" + (" PyTorch eager fp32 | ratio |" if ref else "")
    rule = "| --- | --- |" + (" --- | --- |" if ref else "")
    rows = [head, rule]

    def row(label, key, ratio_key=None, unit=" ms"):
        cells = f"| {label} | {_fmt(ours[key], unit)} |"
        if ref:
            cells += f" {_fmt(ref[key], unit)} | {r[ratio_key]:.2f}× |"
        rows.append(cells)

    row("vision per tile", "vision_ms_per_tile", "vision_speedup")
    row("projector per tile", "projector_ms_per_tile", "projector_speedup")
    for tiles in ours["ttft_ms"]:
        cells = f"| time to first token, {tiles} tiles ({ours['prompt_tokens'][tiles]} tokens) | {_fmt(ours['ttft_ms'][tiles], ' ms')} |"
        if ref:
            cells += f" {_fmt(ref['ttft_ms'][tiles], ' ms')} | {r[f'ttft_speedup_{tiles}_tiles']:.2f}× |"
        rows.append(cells)
    row(f"decode ({ours['new_tokens']} tokens)", "decode_tokens_per_s", "decode_speedup", " tok/s")
    cells = f"| peak RSS | {ours['peak_rss_mib']:.0f} MiB |"
    if ref:
        cells += f" {ref['peak_rss_mib']:.0f} MiB | {r['peak_rss_ratio']:.2f}× |"
    rows.append(cells)
    cells = f"| model bytes | {ours['model_bytes'] / 2**20:.0f} MiB |"
    if ref:
        cells += f" {ref['model_bytes'] / 2**20:.0f} MiB | |"
    rows.append(cells)
    m = report["machine"]
    footer = f"\nMedian (min–max) of each measurement after a warm-up; {m['cpu']}, {m['cores']} cores, {m['date']}."
    return "\n".join(rows) + footer
