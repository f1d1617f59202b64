"""The history is typed: every op written by History.record reads back as the same op (with the
time History gave it), and a line that does not decode is an error naming the file and the line.
"""

from __future__ import annotations

import msgspec
import pytest

from pdcheck.history import Fail, Fault, History, Info, Invoke, Note, Ok, read_history
from pdcheck.types import Calibration, EngineState, Outcome, Rule, Transfer, Verdict

STRICT = Calibration(Rule.STRICT, 0.0, 0.0, "oracle bitwise stable")
DIVERGED = Verdict("r-len65", Outcome.DIVERGED, Rule.STRICT, "token 5", position=5, expected=[105], actual=[7])
OPS = [
    Note(config="c", calibration=STRICT),
    Invoke(config="c", request_id="r-len65", prompt_len=65, topology="1P1D", prefill="prefill0", decode="decode0"),
    Invoke(config="api", request_id="api-n2", body={"n": 2, "seed": 7}),
    Ok(config="c", request_id="r-len31", verdict=Verdict("r-len31", Outcome.MATCH, Rule.STRICT), external_tokens=0),
    Fail(config="c", request_id="r-len65", verdict=DIVERGED, external_tokens=64, known_defect="some-defect",
         transfer=Transfer(saved_blocks=2, loaded_blocks=2, loaded_bytes=4096), faulted=True, tokens=[1, 7],
         expected=[1, 105]),
    Info(config="c", request_id="r-len95", detail="timed out"),
    Fault(config="c", fault="pause", phase="inject", batch=1, instance="decode0", seconds=0.1),
    Fault(config="c", fault="pause", phase="heal", batch=1, instance="decode0"),
    Fault(fault="hook", phase="inject", command="kill -STOP 1", before_request=3, seconds=0.01, returncode=0),
    Fault(config="client-faults", fault="disconnect", request_id="disconnect-len31", detail="closed"),
    Note(config="c", instance="decode0", drained=EngineState(0.01, 0, 0, held=("r-len65",))),
    Note(config="c", instance="prefill0"),  # not running: no state
    Note(metrics_before={"http://a": EngineState(0.0, 0, 0), "http://b": None}),
]


def written(tmp_path, ops) -> list:
    history = History(tmp_path / "history.jsonl")
    for op in ops:
        history.record(op)
    history.close()
    return read_history(history.path)


def test_every_op_reads_back_as_the_same_type_with_its_time(tmp_path):
    read = written(tmp_path, OPS)
    assert [msgspec.structs.replace(op, time=0.0) for op in read] == OPS
    times = [op.time for op in read]
    assert times == sorted(times) and all(t > 0 for t in times)


def test_lines_are_tagged_by_kind_and_leave_defaults_out(tmp_path):
    written(tmp_path, [Fault(config="c", fault="disconnect", request_id="d-len31")])
    (line,) = (tmp_path / "history.jsonl").read_text().splitlines()
    assert set(msgspec.json.decode(line)) == {"kind", "time", "config", "fault", "request_id"}
    assert msgspec.json.decode(line)["kind"] == "fault"


def test_a_line_that_does_not_decode_names_the_file_and_line(tmp_path):
    path = tmp_path / "history.jsonl"
    written(tmp_path, OPS[:2])
    with path.open("ab") as f:
        f.write(b'{"kind": "invoke", "config": "c"}\n')  # no request_id
    with pytest.raises(ValueError, match=f"{path}:3: "):
        read_history(path)
    path.write_bytes(b'{"kind": "note"}\n\n{"kind": "launch", "time": 1.0}\n')
    with pytest.raises(ValueError, match=f"{path}:3: "):
        read_history(path)


@pytest.mark.parametrize("status, seen, kind", [
    ("caught", "press0 diverged", Ok), ("survived", "failure: escaped", Fail),
    ("survived", "timed out after 600s", Info), ("GPU tier", "not run: no CUDA GPU", Info)])
def test_a_mutant_run_completes_as_ok_fail_or_info(status, seen, kind):
    """Caught is ok, survived is fail; cut off by the timeout, or not run, the outcome is unknown."""
    from pdcheck.bench.mutants import Row, completion

    op = completion(Row("FreeBeforeSend", "use after free", "", "CPU", status, "t.py::test_x", seen, 1.5, "r"))
    assert (type(op), op.request_id, op.detail, op.seconds) == (kind, "FreeBeforeSend", f"{status}: {seen}", 1.5)
