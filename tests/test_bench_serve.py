"""`vl-export bench-serve` on the tiny bundle: the levels it promises, the conversation's reuse, the table."""

from __future__ import annotations

import json

from vl_export.cli import main


def test_bench_serve_measures_levels_and_a_conversation_with_and_without_reuse(bundle_fp32, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench-serve", "--bundle", str(bundle_fp32), "--threads", "1", "--concurrency", "1,3",
                 "--max-tokens", "6", "--conversation-tiles", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [level["streams"] for level in report["levels"]] == [1, 3] and report["max_batch"] == 3
    for level in report["levels"]:
        assert 0 < level["generated_tokens"] <= 6 * level["streams"]
        assert 0 < level["ttft_p50_s"] <= level["ttft_p95_s"] and level["aggregate_tok_s"] > 0
    talk = report["conversation"]
    # With the cache the second round reuses at least the first round's prompt (its 768 image tokens among them);
    # the server without it prefills everything.
    assert talk["with_reuse"]["round2_cached_tokens"] > 768
    assert talk["without_reuse"]["round2_cached_tokens"] == 0
    assert talk["with_reuse"]["round2_prompt_tokens"] == talk["without_reuse"]["round2_prompt_tokens"]
    table = capsys.readouterr().out
    assert "| 3 |" in table and "round 2 TTFT" in table and "KV cache budget 256 MB" in table


def test_bench_serve_refuses_a_malformed_concurrency(bundle_fp32, capsys):
    assert main(["bench-serve", "--bundle", str(bundle_fp32), "--concurrency", "1,two"]) == 2
    assert "--concurrency takes counts like 1,2,4,8" in capsys.readouterr().err
