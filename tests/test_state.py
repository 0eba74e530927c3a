"""The run state (``<output>/_srbatch/``): planning from it is exactly what the manifest's history implies, however the
state came to be (kept up to date by every run, missing runs killed before their end, deleted, corrupted); and the
real job resumes from a crash between its manifest parts and its state update without redoing anything."""

from __future__ import annotations

import io
import logging
import os
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from srbatch.errors import ConfigError
from srbatch.upscale import UpscaleConfig, run_job
from srbatch.upscale.manifest import SCHEMA, ManifestWriter
from srbatch.upscale.plan import make_plan, output_key, output_keys
from srbatch.upscale.state import RunState, fold

FP_NOW, FP_OLD = "f" * 16, "0" * 16


# ---- output keys: the vectorised path equals the per-key definition ------------------------------------------------


def test_vectorised_output_keys_equal_output_key_on_tricky_names():
    rng = random.Random(0)
    alphabet = ["a", "b", "Z", "0", ".", "/", "-", "_", " ", "\u00e9", "e\u0301", "\\", "\x01", "..", "~", "%"]
    rels = [
        "a.png", "b/c.JPG", "noext", "dir.with.dots/file", "a.tar.gz", "x/.hidden.png", ".dot", "a/../b.png",
        "./a.png", "a//b.png", "/abs.png", "a/", "_manifest/x.png", "_srbatch/s.png", "_manifestx/ok.png",
        "x/_srbatch/ok.png", "x/.srbatch-tmp-1/y.png", "caf\u00e9.png", "cafe\u0301.png", "a\\b.png", "tab\t.png",
        "d/e.", "d.e/f", "\u65e5\u672c/\u753b\u50cf.webp", "a..png", "..png",
    ]  # fmt: skip
    rels += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        keys, refused = output_keys(pa.array(rels, pa.string()), fmt)
        for i, rel in enumerate(rels):
            try:
                want = output_key(rel, fmt)
            except ConfigError as e:
                assert keys[i].as_py() is None and refused[i] == str(e), (rel, fmt)
                continue
            assert keys[i].as_py() == want and i not in refused, (rel, fmt, keys[i].as_py(), want)


# ---- planning over a long random history ---------------------------------------------------------------------------


def _history(tmp: Path, n_inputs: int, n_runs: int, seed: int = 1):
    """Random runs over ``n_inputs`` inputs: each run lists a random subset, processes some (ok/failed, with the current
    or an old fingerprint, sometimes another output key), carries others over as skipped copies of their latest
    outcome. Returns the folders, the run tables (oldest first) and the inputs' output URIs."""
    rng = np.random.default_rng(seed)
    src, out = tmp / "in", tmp / "out"
    keys = [f"d{i % 37:02d}/img{i:05d}" for i in range(n_inputs)]
    for k in keys:
        (src / k).parent.mkdir(parents=True, exist_ok=True)
        (src / f"{k}.png").touch()
    uris = np.array([str(src / f"{k}.png") for k in keys], dtype=object)
    outs = np.array([str(out / f"{k}.png") for k in keys], dtype=object)
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    latest: dict[int, dict] = {}
    runs = []
    for r in range(n_runs):
        listed = np.flatnonzero(rng.random(n_inputs) < 0.8)
        act = rng.random(len(listed))
        rows = []
        for j, i in enumerate(listed):
            prev = latest.get(i)
            t = t0 + timedelta(hours=6 * r, microseconds=int(rng.integers(0, 10**9)))
            if prev is not None and prev["status"] == "ok" and act[j] < 0.6:
                row = dict(prev, run_id=f"r{r:03d}", status="skipped", finished_at=t, actor_id=None, total_s=None)
            else:
                fp = FP_NOW if rng.random() < 0.85 else FP_OLD
                status = "ok" if rng.random() < 0.8 else "failed"
                o = outs[i] if rng.random() < 0.95 else outs[i].replace(".png", ".jpg")
                row = {"run_id": f"r{r:03d}", "input_uri": uris[i], "output_uri": o if status == "ok" else None,
                       "status": status, "fingerprint": fp, "finished_at": t, "actor_id": f"a{r}",
                       "total_s": float(rng.random()), "error_type": None if status == "ok" else "DecodeError"}  # fmt: skip
                latest[i] = row
            rows.append(row)
        runs.append(pa.Table.from_pylist([{f.name: x.get(f.name) for f in SCHEMA} for x in rows], schema=SCHEMA))
    # outputs on disk: most ok outputs exist, a few were deleted by someone
    for i in range(n_inputs):
        if rng.random() < 0.9:
            Path(outs[i]).parent.mkdir(parents=True, exist_ok=True)
            Path(outs[i]).touch()
    return src, out, runs, outs


def _oracle(runs: list[pa.Table], out: Path, fp: str) -> tuple[set[str], set[str]]:
    """Independent of srbatch: pandas over every run's rows. Done = latest ok/failed row (by finished_at) is ok with
    fingerprint ``fp`` and the expected output key, and that output file exists."""
    df = pd.concat([t.to_pandas() for t in runs])
    df = df[df.status.isin(["ok", "failed"])].sort_values("finished_at", kind="stable")
    last = df.groupby("input_uri").tail(1).set_index("input_uri")
    done = set()
    for uri, row in last.iterrows():
        key = os.path.relpath(uri, str(out.parent / "in"))
        want = str(out / (os.path.splitext(key)[0] + ".png"))
        if row.status == "ok" and row.fingerprint == fp and row.output_uri == want and os.path.exists(want):
            done.add(uri)
    return done, set(last.index)


def _write_runs(out: Path, runs: list[pa.Table], *, commit: set[int]) -> None:
    """The runs' manifest parts as the job writes them; the state updated at the end of the runs in ``commit`` (the
    others were killed before their end)."""
    store = RunState(str(out))
    state, folded = None, []
    for r, t in enumerate(runs):
        rid = t["run_id"][0].as_py()
        w = ManifestWriter(str(out), rid, flush_rows=997)
        for start in range(0, t.num_rows, 1500):
            w.add_table(t.slice(start, 1500), rows_per_part=700)
        w.close()
        if r in commit:
            state = fold(state, w.outcome_table())
            folded.append(rid)
            store.write_state(state, folded)


def _plan(src: Path, out: Path, state):
    cfg = UpscaleConfig(input=str(src), output=str(out), model="bicubic", scale=2, progress=False, run_id="next")
    return make_plan(cfg, FP_NOW, state)


@pytest.mark.parametrize("how", ["up to date", "last runs killed", "state deleted", "state corrupted"])
def test_plan_is_exact_after_dozens_of_runs(tmp_path, how, caplog):
    n, r = 2500, 30
    src, out, runs, outs = _history(tmp_path, n, r)
    commit = set(range(r)) if how != "last runs killed" else set(range(r - 3)) | {r - 2}
    _write_runs(out, runs, commit=commit)
    state_file = out / "_srbatch" / "state.parquet"
    if how == "state deleted":
        state_file.unlink()
    elif how == "state corrupted":
        state_file.write_bytes(b"PAR1 this is not a parquet file")
    with caplog.at_level(logging.WARNING, logger="srbatch.upscale"):
        loaded = RunState(str(out)).load()
    plan = _plan(src, out, loaded.table)
    done, seen = _oracle(runs, out, FP_NOW)
    skipped = set(plan.done.to_pylist())
    todo = set(plan.todo["input_uri"].to_pylist())
    listed = {str(p) for p in src.rglob("*.png")}
    assert skipped == done & listed and todo == listed - done and not plan.rejected
    assert plan.total == len(listed) == n
    assert set(loaded.table["input_uri"].to_pylist()) == seen and loaded.table.num_rows == len(seen)
    assert loaded.table.column_names == ["input_uri", "status", "fingerprint", "output_uri"]
    # the skipped rows carry the latest outcome over, stamped with this run
    sk = pa.concat_tables(RunState(str(out)).skipped_tables(plan.done, "next")).to_pandas().set_index("input_uri")
    assert sorted(sk.index) == sorted(skipped)
    assert (sk.run_id == "next").all() and (sk.status == "skipped").all() and sk.total_s.isna().all()
    assert (sk.fingerprint == FP_NOW).all() and all(sk.output_uri.loc[u] == u.replace(str(src), str(out)) for u in sk.index)
    print(f"\n{how}: {len(todo)} to do, {len(skipped)} skipped of {n} inputs after {r} runs "
          f"({sum(t.num_rows for t in runs)} manifest rows)")
    if how == "up to date":
        assert loaded.recovered_runs == [] and not loaded.rebuilt and not caplog.records
    elif how == "last runs killed":
        assert loaded.recovered_runs == ["r027", "r029"] and not loaded.rebuilt
        assert "ended before updating the run state" in caplog.text
    else:
        assert loaded.rebuilt and "rebuilding it from 30 run partition(s)" in caplog.text


def test_fold_keeps_the_latest_outcome_and_ignores_skipped_rows():
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def rows(*spec):
        return pa.Table.from_pylist(
            [{f.name: None for f in SCHEMA} | {"run_id": r, "input_uri": u, "status": s, "finished_at": t + timedelta(
                seconds=sec)} for r, u, s, sec in spec], schema=SCHEMA)  # fmt: skip

    state = fold(None, rows(("1", "a", "ok", 1), ("1", "b", "failed", 1), ("1", "c", "skipped", 1)))
    assert sorted(state["input_uri"].to_pylist()) == ["a", "b"]  # skipped rows are carry-overs, never outcomes
    state = fold(state, rows(("2", "a", "skipped", 5), ("2", "b", "ok", 5), ("2", "d", "failed", 5)))
    got = {r["input_uri"]: (r["run_id"], r["status"]) for r in state.to_pylist()}
    assert got == {"a": ("1", "ok"), "b": ("2", "ok"), "d": ("2", "failed")}
    # an older row folded late (a killed run's parts found after a newer run) does not win
    state = fold(state, rows(("0", "b", "failed", 0), ("3", "a", "failed", 9), ("3", "a", "ok", 8)))
    got = {r["input_uri"]: (r["run_id"], r["status"]) for r in state.to_pylist()}
    assert got == {"a": ("3", "failed"), "b": ("2", "ok"), "d": ("2", "failed")}


# ---- the real job ----------------------------------------------------------------------------------------------------


def _png(seed: int, size: tuple[int, int] = (10, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _outputs(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*.png")}


@pytest.mark.slow
def test_job_resumes_after_a_crash_between_its_parts_and_its_state(ray_cluster, tmp_path, caplog):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(5):
        (src / f"im{i}.png").write_bytes(_png(i))
    (src / "broken.png").write_bytes(b"not a png")
    base = dict(input=str(src), output=str(out), model="bicubic", scale=2, progress=False, max_failed_fraction=1.0)
    r1 = run_job(UpscaleConfig(**base, run_id="r1"))
    assert (r1.ok, r1.failed, r1.skipped) == (5, 1, 0)
    state_after_r1 = (out / "_srbatch" / "state.parquet").read_bytes()
    for i in range(5, 8):
        (src / f"im{i}.png").write_bytes(_png(i))
    r2 = run_job(UpscaleConfig(**base, run_id="r2"))
    assert (r2.ok, r2.failed, r2.skipped) == (3, 1, 5)
    # r2 "crashed" after writing its parts, before updating the state: the state is r1's, r2 has no run record
    (out / "_srbatch" / "state.parquet").write_bytes(state_after_r1)
    (out / "_srbatch" / "runs" / "r2.json").unlink()
    before = _outputs(out)
    with caplog.at_level(logging.WARNING, logger="srbatch.upscale"):
        r3 = run_job(UpscaleConfig(**base, run_id="r3"))
    assert (r3.ok, r3.failed, r3.skipped) == (0, 1, 8)  # nothing with a valid output redone; the broken one retried
    assert _outputs(out) == before
    assert "folded 1 run(s) that ended before updating the run state: r2" in caplog.text
    rec = RunState(str(out)).run_records()
    assert rec["r2"]["complete"] is False and rec["r2"]["recovered_by"] == "r3" and rec["r2"]["ok"] == 3
    assert rec["r3"]["complete"] is True and (rec["r3"]["ok"], rec["r3"]["skipped"]) == (0, 8)
    # the state now holds r2's outcomes: deleting it rebuilds the same plan, with a warning
    (out / "_srbatch" / "state.parquet").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="srbatch.upscale"):
        r4 = run_job(UpscaleConfig(**base, run_id="r4"))
    assert (r4.ok, r4.failed, r4.skipped) == (0, 1, 8) and _outputs(out) == before
    assert "rebuilding it from 3 run partition(s)" in caplog.text
    # corrupted: the same
    (out / "_srbatch" / "state.parquet").write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="srbatch.upscale"):
        r5 = run_job(UpscaleConfig(**base, run_id="r5"))
    assert (r5.ok, r5.failed, r5.skipped) == (0, 1, 8) and _outputs(out) == before
    assert "cannot be read" in caplog.text
    assert not list((out / "_srbatch" / "active").glob("*.json"))  # every run removed its marker


def test_trusting_the_state_skips_the_output_listing_and_its_check(tmp_path):
    """``--check-outputs trust``: inputs whose state says done are skipped even when their output was deleted (the
    listing is not made); ``list`` (the default) redoes them."""
    src, out, runs, outs = _history(tmp_path, 400, 6, seed=3)
    _write_runs(out, runs, commit=set(range(6)))
    state = RunState(str(out)).load().table
    done_listed, _ = _oracle(runs, out, FP_NOW)
    missing = [o for o in outs if not os.path.exists(o)]
    assert missing  # the history deleted some outputs
    for o in missing:  # make the outputs exist to get the oracle's answer without the existence check
        Path(o).parent.mkdir(parents=True, exist_ok=True)
        Path(o).touch()
    done_all, _ = _oracle(runs, out, FP_NOW)
    for o in missing:
        os.remove(o)
    assert done_all > done_listed
    base = dict(input=str(src), output=str(out), model="bicubic", scale=2, progress=False)
    listed = make_plan(UpscaleConfig(**base), FP_NOW, state)
    trusted = make_plan(UpscaleConfig(**base, check_outputs="trust"), FP_NOW, state)
    assert set(listed.done.to_pylist()) == done_listed
    assert set(trusted.done.to_pylist()) == done_all
