"""benchmarks/serve.py: the metric computations on hand-built timestamps, the report, and one smoke run.

The benchmarks folder is a package (`python -m benchmarks.serve`), importable because pytest puts the repository
on the path (pyproject's `pythonpath`). No tests/benchmarks/__init__.py: as a package this folder would be called
`benchmarks` too.
"""

from __future__ import annotations

import asyncio
import math
import random
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from benchmarks.common import replace_section, write_section

from benchmarks import serve

REPO = Path(__file__).resolve().parents[2]
RequestRecord, LevelResult = serve.RequestRecord, serve.LevelResult


def ok(sent: float, tokens: list[float], done: float, output_tokens: int | None = None) -> RequestRecord:
    return RequestRecord(sent, tokens, done, len(tokens) if output_tokens is None else output_tokens)


# --- metrics ----------------------------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    assert serve.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert serve.percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert serve.percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0  # unsorted input
    assert serve.percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert serve.percentile([7.0], 99) == 7.0
    assert math.isnan(serve.percentile([], 50))
    values = [random.Random(3).uniform(0, 10) for _ in range(37)]
    for q in (1, 25, 50, 90, 99):
        assert serve.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_request_metrics_from_timestamps() -> None:
    record = ok(10.0, [10.1, 10.15, 10.25, 10.3], 10.4)
    assert record.ttft == pytest.approx(0.1)
    assert record.e2e == pytest.approx(0.4)
    assert record.itls == pytest.approx([0.05, 0.1, 0.05])
    assert record.tpot == pytest.approx((0.4 - 0.1) / 3)  # (e2e - TTFT) / (tokens - 1), the tail included


def test_tpot_counts_the_usage_tokens_not_the_frames() -> None:
    # 4 tokens, but one completed no character: 3 frames
    record = ok(0.0, [0.1, 0.2, 0.4], 0.4, output_tokens=4)
    assert record.tpot == pytest.approx(0.1)
    assert record.itls == pytest.approx([0.1, 0.2])


def test_tpot_is_undefined_for_one_token_and_ttft_without_frames() -> None:
    assert ok(0.0, [0.2], 0.3).tpot is None
    refused = RequestRecord(0.0, [], 0.01, 0, "rejected", 3040)
    assert refused.ttft is None and refused.tpot is None and refused.itls == []


def test_summary_of_values_and_of_nothing() -> None:
    summary = serve.Summary.of([0.1, 0.2, 0.3, 0.4])
    assert summary.mean == pytest.approx(0.25)
    assert summary.p50 == pytest.approx(0.25)
    assert summary.p99 == pytest.approx(0.397)
    assert all(math.isnan(v) for v in (serve.Summary.of([]).mean, serve.Summary.of([]).p99))


def level(path: str = "HTTP", clients: int = 2, wall: float = 2.0, **loads: float) -> LevelResult:
    records = [
        ok(0.0, [0.1, 0.2, 0.3], 0.3),
        ok(0.0, [0.3, 0.5, 0.7, 0.9], 0.9),
        RequestRecord(0.5, [], 0.51, 0, "rejected", 3040),
        RequestRecord(0.6, [], 0.62, 0, "rejected", 3021),
        RequestRecord(0.7, [0.8], 0.9, 0, "error"),
    ]
    return LevelResult(path, clients, 4, records, wall, **loads)


def test_level_result_counts_throughputs_and_latencies() -> None:
    result = level()
    assert len(result.completed) == 2
    assert result.rejected == 2 and result.errors == 1
    assert result.rejection_codes == {3040: 1, 3021: 1}
    assert result.output_tokens == 7
    assert result.request_throughput == pytest.approx(1.0)  # 2 completed in 2 s
    assert result.output_throughput == pytest.approx(3.5)
    assert result.ttft.mean == pytest.approx(0.2)  # 0.1 and 0.3: refused and failed requests left out
    assert result.tpot.mean == pytest.approx((0.1 + 0.2) / 2)  # 0.2/2 and 0.6/3
    assert result.itl.mean == pytest.approx(0.8 / 5)  # 0.1, 0.1, 0.2, 0.2, 0.2 pooled
    assert result.itl.p50 == pytest.approx(0.2)
    assert result.e2e.mean == pytest.approx(0.6)


def test_pool_merges_rounds() -> None:
    a = level(wall=1.0, own_load=0.2, other_load=0.01)
    b = level(wall=3.0, own_load=0.6, other_load=0.05)
    pooled = serve.pool([a, b])
    assert pooled.wall == 4.0
    assert len(pooled.records) == 10 and len(pooled.completed) == 4
    assert pooled.request_throughput == pytest.approx(1.0)
    assert pooled.own_load == pytest.approx(0.5)  # weighted by wall time
    assert pooled.other_load == 0.05  # the worst round
    assert (pooled.rounds, pooled.rounds_measured) == (2, 2)


def test_pool_leaves_out_disturbed_rounds() -> None:
    quiet = level(wall=1.0, other_load=0.02)
    busy = level(wall=9.0, other_load=0.5)
    pooled = serve.pool([busy, quiet, level(wall=2.0, other_load=0.1)])
    assert (pooled.rounds, pooled.rounds_measured) == (2, 3)
    assert pooled.wall == 3.0 and pooled.other_load == 0.1
    only_busy = serve.pool([busy, level(wall=4.0, other_load=0.3)])  # none quiet: the least disturbed
    assert (only_busy.rounds, only_busy.wall, only_busy.other_load) == (1, 4.0, 0.3)


def test_tpot_ratio_http_over_engine() -> None:
    http = LevelResult("HTTP", 1, 4, [ok(0.0, [0.1, 0.2, 0.31, 0.42], 0.43)], 1.0)
    engine = LevelResult("engine", 1, 4, [ok(0.0, [0.1, 0.2, 0.3, 0.4], 0.4)], 1.0)
    assert serve.tpot_ratio(http, engine) == pytest.approx(0.11 / 0.1)
    assert serve.tpot_ratio(http, engine, "p50") == pytest.approx(0.11 / 0.1)


# --- the Workers AI stream --------------------------------------------------------------------------------------


def test_classify_frame() -> None:
    assert serve.classify_frame('data: {"response":"Once"}') == ("token", {"response": "Once"})
    kind, payload = serve.classify_frame(
        'data: {"response":"","usage":{"prompt_tokens":5,"completion_tokens":8,"total_tokens":13,"neurons":2.4}}')
    assert kind == "usage" and payload["usage"]["completion_tokens"] == 8
    assert serve.classify_frame("data: [DONE]") == ("done", None)
    kind, payload = serve.classify_frame(
        'data: {"response":"","errors":[{"code":3043,"message":"Internal server error"}]}')
    assert kind == "error" and serve.error_code(payload) == 3043
    assert serve.classify_frame('data: {"response":""}')[0] == "other"
    assert serve.classify_frame("")[0] == "other"
    assert serve.classify_frame(": keep-alive")[0] == "other"


def test_a_data_line_that_is_not_json_is_another_frame() -> None:
    """It used to raise JSONDecodeError and end the benchmark."""
    assert serve.classify_frame("data: <html>502 Bad Gateway</html>") == ("other", None)
    assert serve.classify_frame("data: 42") == ("other", None)  # JSON, but not an object


def test_a_stream_with_a_line_that_is_not_json_is_still_measured() -> None:
    frames = ['data: {"response":"Once"}', "data: not json", 'data: {"response":" upon"}',
              'data: {"response":"","usage":{"prompt_tokens":5,"completion_tokens":2}}', "data: [DONE]"]

    async def send() -> RequestRecord:
        body = "".join(f"{frame}\n\n" for frame in frames).encode()
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await serve.http_request(client, "http://bench/run", {}, b"{}")

    record = asyncio.run(send())
    assert (record.status, len(record.token_times), record.output_tokens, record.prompt_tokens) == ("ok", 2, 2, 5)


def test_error_code_of_an_envelope() -> None:
    body = b'{"result":null,"success":false,"errors":[{"code":3040,"message":"Capacity"}],"messages":[]}'
    assert serve.error_code(body) == 3040
    assert serve.error_code(b"not json") is None
    assert serve.error_code(b'{"errors":[]}') is None


# --- the report -------------------------------------------------------------------------------------------------


def test_results_table_row() -> None:
    table = serve.results_table([level()])
    assert table[0].startswith("| clients | path | rounds | max_tokens |")
    assert table[2] == ("| 2 | HTTP | 1 of 1 | 4 | 3–4 | 2 | 2 (3021: 1, 3040: 1), 1 errors | 1.00 | 3.5 | "
                        "200 / 200 / 298 | 150 / 150 / 199 | 160 / 200 / 200 | 600 / 600 / 894 |")


def test_ms_formatting() -> None:
    assert serve.ms(0.00123) == "1.23"
    assert serve.ms(0.0123) == "12.3"
    assert serve.ms(0.123) == "123"
    assert serve.ms(math.nan) == "—"


def pair(http_tpot: float, engine_tpot: float, clients: int) -> tuple[LevelResult, LevelResult]:
    def result(path: str, tpot: float) -> LevelResult:
        return LevelResult(path, clients, 3, [ok(0.0, [0.1, 0.1 + tpot, 0.1 + 2 * tpot], 0.1 + 2 * tpot)], 1.0)

    return result("HTTP", http_tpot), result("engine", engine_tpot)


def test_goal_verdict() -> None:
    assert serve.goal_verdict([pair(0.104, 0.1, 1), pair(0.1, 0.1, 4)]).startswith(
        "**Goal, the HTTP path adds ≤ 5% to TPOT (mean): met** at every client count (+4.0% at 1, +0.0% at 4)")
    assert "not met** at any client count (+20.0% at 1)" in serve.goal_verdict([pair(0.12, 0.1, 1)])
    assert "met at 4 clients, not at 1**" in serve.goal_verdict([pair(0.2, 0.1, 1), pair(0.1, 0.1, 4)])


def test_overhead_table_row() -> None:
    http, engine = pair(0.11, 0.1, 4)
    http.server_load, http.own_load, http.other_load, engine.own_load = 0.8, 0.1, 0.02, 0.9
    row = serve.overhead_table([(http, engine)])[2]
    assert row == "| 4 | 110 | 100 | **1.100** | 1.100 | 1.000 | 80% / 10% / 2% | 90% / 0% |"


def info(label: str = "stories260K") -> object:
    machine = {"cpu": "AMD EPYC", "cores": "2", "isa": "; no avx512_vnni", "ram": "24 GiB", "torch": "2.13.0",
               "capability": "AVX2", "threads": "2"}
    return serve.RunInfo(label=label, command="bench", machine=machine, model="m", served="s", workload="w",
                         wait_quiet=120, rounds=1, minutes=1.5)


def test_build_section_has_both_tables_and_the_verdict() -> None:
    http, engine = pair(0.1, 0.1, 1)
    section = serve.build_section(info(), [engine, http])
    lines = section.splitlines()
    assert lines[0] == "## Serving: stories260K, HTTP streaming against the engine alone"
    assert "2 cores (no avx512_vnni)" in section
    rows = [line for line in lines if line.startswith("| 1 |")]
    assert [row.split(" | ")[1] for row in rows[:2]] == ["HTTP", "engine"]  # HTTP first whatever the input order
    assert "**Goal, the HTTP path adds ≤ 5% to TPOT (mean): met**" in section


def test_replace_section_keeps_the_rest_of_the_file() -> None:
    old = serve.build_section(info(), [*pair(0.2, 0.1, 1)])
    other = serve.build_section(info("7b"), [*pair(0.1, 0.1, 1)])
    engine_section = "<!-- benchmarks/engine.py: begin -->\nengine\n<!-- benchmarks/engine.py: end -->\n"
    text = replace_section(replace_section(f"# Benchmarks\n\nintro\n\n{engine_section}", old, "serve.py",
                                           "stories260K"), other, "serve.py", "7b")
    new = serve.build_section(info(), [*pair(0.1, 0.1, 1)])
    replaced = replace_section(text, new, "serve.py", "stories260K")
    assert replaced == text.replace(old.rstrip(), new.rstrip())
    assert other.rstrip() in replaced and "engine\n" in replaced
    appended = replace_section("# Benchmarks\n", new, "serve.py", "elsewhere")
    assert appended == ("# Benchmarks\n\n<!-- benchmarks/serve.py elsewhere: begin -->\n" + new.rstrip()
                        + "\n<!-- benchmarks/serve.py elsewhere: end -->\n")


def test_write_section_creates_then_replaces(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "benchmarks.md"
    write_section(path, serve.build_section(info(), [*pair(0.2, 0.1, 1)]), "serve.py", "stories260K")
    write_section(path, serve.build_section(info(), [*pair(0.1, 0.1, 1)]), "serve.py", "stories260K")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("<!-- benchmarks/serve.py stories260K: begin -->") == 1
    assert ": met**" in text


def test_default_label_and_per_level_values() -> None:
    assert serve.default_label(Path("/x/stories260K/hf")) == "stories260K"
    assert serve.default_label(Path("/x/llama2-7b-shape-int8")) == "llama2-7b-shape-int8"
    args = serve.parse_args(["--model", "m", "--clients", "1", "4", "8", "--max-tokens", "32", "32", "16"])
    assert args.max_tokens == [32, 32, 16] and args.requests == [4, 4, 4]
    with pytest.raises(SystemExit):
        serve.parse_args(["--model", "m", "--clients", "1", "4", "--max-tokens", "8", "8", "8"])


# --- the whole script -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_against_stories260k(stories_hf: Path, tmp_path: Path) -> None:
    """A server started by the script, 1 and 2 clients, a few tokens, written into a copy of a docs file."""
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    command = [sys.executable, "-m", "benchmarks.serve", "--model", str(stories_hf), "--clients", "1", "2",
               "--max-tokens", "6", "--requests", "1", "--wait-quiet", "0", "--attempts", "1", "--write", str(docs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert "<!-- benchmarks/serve.py stories260K: begin -->" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| 1 | ", "| 2 | "))]
    table = {(row[0].strip("| "), row[1]): row for row in rows if row[1] in ("HTTP", "engine")}
    assert set(table) == {("1", "HTTP"), ("1", "engine"), ("2", "HTTP"), ("2", "engine")}
    for (clients, _), row in table.items():
        # one round; every request generated 6 tokens and completed; no 429
        assert row[2] == "1 of 1" and row[4:7] == ["6", clients, "0"]
    assert "**Goal, the HTTP path adds ≤ 5% to TPOT (mean): " in text
