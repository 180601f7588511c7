import json

import pytest

from workers.trace import OUTBOX_ROW, Tracer, chrome_trace, summarize


def test_spans_become_one_row_per_stage_and_a_summary_in_percent_of_wall_time():
    first, second = Tracer(True), Tracer(True)
    first.add("train", 0.0, 0.6, step=1)  # stage 1: 60% training, 10% sending, 30% other (it drew data)
    first.add("send", 0.6, 0.7, step=1)
    first.add("link_credit", 0.7, 0.75, step=1)  # its outbox's thread, at the same time as the stage: another row
    first.add("link_send", 0.75, 0.8, step=1)
    second.add("input", 0.0, 0.5, step=1)  # stage 2: waits, trains, waits for credit, saves
    second.add("train", 0.5, 0.8, step=1)
    second.add("credit", 0.8, 0.9, step=1)
    second.add("checkpoint", 0.9, 1.0, step=1)
    trace = json.loads(json.dumps(chrome_trace({0: first.spans, 1: second.spans})))  # what trace.json holds
    rows = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert rows == {0: "stage 1", OUTBOX_ROW: "stage 1 outbox", 1: "stage 2"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans[0] == {"name": "train", "cat": "train", "ph": "X", "pid": 0, "tid": 0, "ts": 0, "dur": 600000,
                        "args": {"step": 1}}
    assert [(e["name"], e["tid"]) for e in spans[2:4]] == [("link_credit", OUTBOX_ROW), ("link_send", OUTBOX_ROW)]
    one, two = summarize(trace)
    assert one["wall_s"] == 1.0
    assert (one["busy"], one["train"], one["input"], one["credit"]) == pytest.approx((60, 60, 0, 0))
    assert one["other"] == pytest.approx(40)  # sending counts as other
    assert (two["busy"], two["train"], two["input"], two["credit"], two["other"]) == pytest.approx((40, 30, 50, 10, 0))


def test_a_disabled_tracer_records_nothing():
    tracer = Tracer(False)
    tracer.add("train", 0.0, 1.0)
    assert tracer.spans == [] and summarize(chrome_trace({0: tracer.spans})) == []


@pytest.mark.parametrize("ts,dur,message", [
    (0, 0, "its spans cover 0 µs, not a positive length of time"),
    (1e308, 1e308, "its spans cover inf µs"),  # finite each, but their sum is not
    (0, -5, "a 'train' span has ts 0 and dur -5, which are not times"),
    (float("nan"), 5, "which are not times"),
    (0, "5", "which are not times"),
])
def test_a_trace_whose_spans_are_not_times_is_refused(ts, dur, message):
    trace = {"traceEvents": [{"name": "train", "ph": "X", "pid": 0, "tid": 0, "ts": ts, "dur": dur}]}
    with pytest.raises(ValueError, match=message):
        summarize(trace)
