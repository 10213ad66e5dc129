"""The journal of LLM answers (castore.answers): what a killed run was answered is found
by the next run's exact request, each answer used once; torn lines are not answers."""

from __future__ import annotations

import os
import shutil

import blake3

from castore.answers import Answers, request_key
from castore.store import Store


def rid(name: str) -> str:
    """A run id as castore makes them (32 hex), named for the test."""
    return blake3.blake3(name.encode()).hexdigest()[:32]


def text_of(found: tuple[str, str] | None) -> str | None:
    return found[0] if found is not None else None


def killed(store: Store, name: str, key: str, *texts: str, sig: str = "s" * 64) -> Answers:
    """The journal a run named `name` left after receiving `texts` for `key` and being
    killed (a journal that stays for the next run)."""
    run = Answers(store, rid(name), sig)
    for text in texts:
        run.record(key, text)
    run.close(finished=False)
    return run


def test_answers_of_a_dead_run_are_found_once_each_and_torn_lines_ignored(tmp_path):
    store = Store(tmp_path / "c")
    dead = Answers(store, rid("dead-run"), "s" * 64)
    k1 = request_key("http://x/v1/chat/completions", {"model": "m", "messages": ["a"]})
    k2 = request_key("http://x/v1/chat/completions", {"model": "m", "messages": ["b"]})
    assert k1 and k2 and k1 != k2
    dead.record(k1, '{"first": "line\\nbreak"}')
    dead.record(k1, '{"second": 1}')  # an equal request (num_generations): its own answer
    dead.record(k2, "x")
    dead.close(finished=False)  # killed: the journal stays
    with open(dead.path, "ab") as f:  # what kill -9 mid-append leaves
        f.write(f'{k2} "torn'.encode())
    mine = Answers(store, rid("next-run"), "t" * 64)
    assert text_of(mine.recovered(k1)) == '{"first": "line\\nbreak"}'
    assert text_of(mine.recovered(k1)) == '{"second": 1}'
    assert mine.recovered(k1) is None  # each answer is used once
    assert text_of(mine.recovered(k2)) == "x" and mine.recovered(k2) is None
    assert mine.reused == 3
    mine.record(k2, "new")
    unused = killed(store, "dead-other", k1, "kept", sig="u" * 64)  # another pipeline's
    mine.close(finished=True)  # its answers and the dead run's are in stored batches
    assert not os.path.exists(dead.path) and not os.path.exists(mine.path)
    assert os.path.exists(unused.path)  # its pipeline's resume may need it
    again = Answers(store, rid("resume"), "u" * 64)  # that pipeline, finished: used or not
    again.close(finished=True)
    assert not os.path.exists(unused.path)


def test_a_live_runs_journal_is_read_but_kept(tmp_path):
    store = Store(tmp_path / "c")
    lock = store.run_lock(rid("live-run"), {})
    lock.acquire()
    live = Answers(store, rid("live-run"), "s" * 64)
    key = request_key("u", {"b": 1})
    assert key
    live.record(key, "answer")
    other = Answers(store, rid("other-run"), "s" * 64)
    assert text_of(other.recovered(key)) == "answer"
    other.close(finished=True)
    assert os.path.exists(live.path)  # its run still needs it
    live.close(finished=True)
    lock.release()
    assert not os.path.exists(live.path)


def test_a_request_that_is_not_plain_json_has_no_key():
    assert request_key("u", {"x": float("nan")}) is None
    assert request_key("u", {"x": object()}) is None
    assert request_key("u", {"a": 1, "b": 2}) == request_key("u", {"b": 2, "a": 1})
    assert request_key("u", {"a": 1}) != request_key("v", {"a": 1})


def test_an_answer_taken_back_is_not_given_again_whichever_journal_holds_it(tmp_path):
    store = Store(tmp_path / "c")
    key = request_key("u", {"q": 1})
    assert key
    killed(store, "a-run", key, "unusable", "good")
    second = Answers(store, rid("b-run"), "s" * 64)
    got = second.recovered(key)
    assert got is not None and got[0] == "unusable"
    second.retract(got[1])  # the row it gave failed: asked again by the next run
    second.close(finished=False)
    third = Answers(store, rid("c-run"), "s" * 64)
    assert text_of(third.recovered(key)) == "good" and third.recovered(key) is None
    token = third.record(key, "also unusable")  # retracted in the journal it is in
    third.retract(token)
    third.close(finished=False)
    assert text_of(Answers(store, rid("d-run"), "s" * 64).recovered(key)) == "good"


def test_a_journal_that_cannot_be_written_is_said_once_and_fails_nothing(tmp_path, caplog):
    store = Store(tmp_path / "c")
    tmp = store.layout.dir("tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with open(tmp, "w") as f:  # tmp/ is a file: nothing can be created in it
        f.write("x")
    answers = Answers(store, rid("run"), "s" * 64)
    key = request_key("u", {"q": 1})
    assert key
    for _ in range(3):
        answers.record(key, "answer")
    said = [r for r in caplog.records if "cannot write the LLM answers journal" in r.message]
    assert len(said) == 1 and "kill -9" in said[0].message


def test_a_damaged_answer_is_not_given(tmp_path):
    """A journal line whose body no longer hashes to its digest (a flipped byte that
    still parses) is skipped, and the next answer of that key is given instead."""
    store = Store(tmp_path / "c")
    key = request_key("u", {"q": 1})
    assert key
    dead = killed(store, "dead", key, "yes", "second")
    with open(dead.path, "rb") as f:
        data = f.read()
    with open(dead.path, "wb") as f:
        f.write(data.replace(b'"yes"', b'"yas"', 1))
    mine = Answers(store, rid("next"), "s" * 64)
    assert text_of(mine.recovered(key)) == "second" and mine.recovered(key) is None
    assert mine.reused == 1


def test_a_segment_goes_once_every_batch_that_wrote_into_it_is_stored(tmp_path, monkeypatch):
    """A journal is cut into segments; one whose batches are all stored whole is removed
    while the run goes on, one a batch that failed wrote into stays for the next run."""
    from castore import answers as answers_module
    from castore.answers import kept_answers

    monkeypatch.setattr(answers_module, "SEGMENT_BYTES", 200)
    store = Store(tmp_path / "c")
    keys = [request_key("u", {"q": i}) for i in range(4)]
    assert all(keys)
    run = Answers(store, rid("run"), "s" * 64)
    failing, stored, late = run.batch(), run.batch(), run.batch()
    failing.record(keys[0], "a" * 150)  # fills segment 0: the next answer opens segment 1
    stored.record(keys[1], "b" * 150)  # segment 1
    late.record(keys[2], "c" * 150)  # segment 2
    segments = [run.segment_path(n) for n in range(3)]
    assert all(map(os.path.exists, segments))
    stored.done(stored=True)
    assert not os.path.exists(segments[1])  # its answers are in a stored batch
    failing.done(stored=False)  # its answers may be needed: kept
    late.record(keys[3], "d")  # segment 3, still being written
    late.done(stored=True)
    assert [os.path.exists(p) for p in segments] == [True, False, False]
    run.close(finished=False)  # killed, say: what is left is what the next run can use
    assert kept_answers(store, "s" * 64) == 1 + 1  # segment 0's and segment 3's
    nxt = Answers(store, rid("next"), "s" * 64)
    assert text_of(nxt.recovered(keys[0])) == "a" * 150
    assert nxt.recovered(keys[1]) is None and nxt.recovered(keys[2]) is None
    assert text_of(nxt.recovered(keys[3])) == "d"
    nxt.close(finished=True)  # the pipeline finished: every segment of the dead run goes
    assert not list((tmp_path / "c" / "tmp").glob("answers-*"))


def test_gc_keeps_a_live_runs_old_segments(tmp_path):
    """A segment kept for a failed batch ages while its run goes on: gc leaves it to the
    run (it removes a dead run's after the grace period, as any leftover in tmp/)."""
    from castore.gc import collect

    store = Store(tmp_path / "c")
    key = request_key("u", {"q": 1})
    assert key
    lock = store.run_lock(rid("live-run"), {})
    lock.acquire()
    live = Answers(store, rid("live-run"), "s" * 64)
    batch = live.batch()
    batch.record(key, "answer")
    batch.done(stored=False)
    os.utime(live.path, (1, 1))  # older than any grace period
    collect(store, grace=0)
    assert os.path.exists(live.path)
    lock.release()
    collect(store, grace=0)
    assert not os.path.exists(live.path)


def test_a_stray_file_named_like_a_journal_is_left_alone(tmp_path):
    """A file in tmp/ castore did not write as a journal (no run id in its name) is not
    read as one, and gc removes it as any leftover instead of failing on its name."""
    from castore.answers import kept_answers
    from castore.gc import collect

    store = Store(tmp_path / "c")
    tmp = tmp_path / "c" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    stray = [tmp / "answers-zzz", tmp / f"answers-{'s' * 64}-..x"]
    for path in stray:
        path.write_text("not a journal\n")
        os.utime(path, (1, 1))
    assert kept_answers(store, "s" * 64) == 0
    Answers(store, rid("run"), "s" * 64).close(finished=True)
    assert all(p.exists() for p in stray)  # not its journals: gc's to judge
    collect(store, grace=0)
    assert not any(p.exists() for p in stray)
