"""Start-up overlap (issue 14): the processing dataset, and with it the OCR actor's model load,
starts before discovery and planning end; the plan reaches it through `pipeline.feed.PlanFeed`.

Real local Ray, the job in this process (`pipeline.run.run`), the tiny random model on CPU.
`PAGEMILL_TEST_HOLD_PLAN_S` holds the finished plan back (a slow discovery): the OCR actor must be
ready before the plan is published. An empty plan (a rerun with nothing to do) and a discovery
that fails both end the job cleanly: the feed is closed on every path, so nothing waits for a plan.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from pipeline.run import HOLD_PLAN_ENV, compose, run

DATA = Path(__file__).resolve().parents[1] / "data"
HOLD_S = 30.0  # well beyond the tiny model's load on a busy 2-core machine (~10-30 s)


@pytest.fixture(scope="module")
def local_ray():
    """One embedded local Ray for the module's runs (`run` joins it), shut down at the end."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "local")  # a fresh embedded Ray, never another job's cluster
        yield
        ray.shutdown()


def _cfg(src: Path, out: Path) -> object:
    return compose(
        [
            "model=tiny_random",
            "mode=tiny",
            "generation.max_new_tokens=8",
            "progress=false",
            f"input.uri={src}",
            f"output.uri={out}",
        ]
    )


def _pump_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "pagemill-receipts" and t.is_alive()]


@pytest.mark.slow
def test_ocr_actor_loads_while_planning_then_a_noop_rerun(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(DATA / "form-libreoffice-01.pdf", src)
    shutil.copy(DATA / "not-a-pdf-01.pdf", src)  # a doc_error row rides the feed too
    out = tmp_path / "out"

    monkeypatch.setenv(HOLD_PLAN_ENV, str(HOLD_S))
    s = run(_cfg(src, out))  # pyright: ignore[reportArgumentType]
    at = s["startup_s"]
    assert s["accounting_ok"] and s["rows_written"] == s["rows_expected"] >= 2
    assert at["ray_init"] <= at["dataset_started"] <= at["discovery"] <= at["plan"] <= at["plan_published"]
    assert at["plan_published"] - at["plan"] >= HOLD_S - 0.5  # the plan was held back
    # the OCR actor was built (model loaded, KV pool allocated) before the plan was published
    assert at["ocr_init_start"] <= at["ocr_load_start"] < at["ocr_ready"] < at["plan_published"]
    assert at["ocr_process_start"] <= at["ocr_init_start"]
    assert at["discovery"] >= at["probed"] >= at["listed"] >= at["ledger"]
    # the render pool started with the dataset: up before its first call, which the plan made
    assert at["render_actor_up_first"] <= at["first_render_call"]
    assert at["plan"] <= at["first_render_call"] <= at["first_page_into_ocr"]
    assert at["plan_published"] <= at["first_page_into_ocr"] <= at["first_row_written"]
    assert at["first_row_written"] <= at["processing_done"]
    assert list(at.values()) == sorted(at.values())  # in the order reached
    cpu = s["stage_cpu_s"]
    assert set(cpu) == {"render", "ocr", "write", "driver"} and all(v > 0 for v in cpu.values())
    assert set(s["ocr_steady"]) == {"pages_per_s", "window_s", "pages"}  # < 10 pages: no figure
    assert not _pump_threads()

    # the same input again: an empty plan; the dataset ends without a page reaching OCR
    monkeypatch.delenv(HOLD_PLAN_ENV)
    t = time.monotonic()
    again = run(_cfg(src, out))  # pyright: ignore[reportArgumentType]
    assert again["accounting_ok"] and again["rows_written"] == 0
    assert again["rows_already_final"] == s["rows_expected"]
    assert "first_page_into_ocr" not in again["startup_s"]
    assert "first_row_written" not in again["startup_s"]
    assert time.monotonic() - t < 300
    assert not _pump_threads()


def test_a_failed_discovery_fails_the_job_without_a_hang(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.discover

    def broken(*_a: object, **_k: object) -> list[dict[str, object]]:
        time.sleep(1.0)  # the dataset is up and waiting on the feed by now
        raise RuntimeError("listing failed: the input store is down")

    monkeypatch.setattr(pipeline.discover, "discover", broken)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(DATA / "form-libreoffice-01.pdf", src)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="listing failed: the input store is down"):
        run(_cfg(src, tmp_path / "out"))  # pyright: ignore[reportArgumentType]
    assert time.monotonic() - t < 120  # the error surfaced: nothing waited for a plan
    deadline = time.monotonic() + 120  # and the processing dataset ends by itself (the feed is closed)
    while _pump_threads() and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not _pump_threads()
    assert not list((tmp_path / "out").glob("pages/*.parquet"))  # nothing written


def test_plan_feed_chunks_and_close() -> None:
    """`PlanFeed` in-process (no Ray): `take` waits for the plan, hands out chunks of about
    1/slots of it, then None; an empty plan (close without publish) gives None at once."""
    import asyncio

    import pyarrow as pa

    from pipeline.feed import PlanFeed

    async def scenario() -> None:
        feed = PlanFeed(slots=4)
        waiting = asyncio.ensure_future(feed.take())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing published yet: the read task waits
        await feed.publish(pa.table({"x": list(range(10))}))
        first = await waiting
        assert first is not None
        chunks = [first]
        while (c := await feed.take()) is not None:
            chunks.append(c)
        assert [c.column("x").to_pylist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
        await feed.close()  # idempotent after the plan
        assert await feed.take() is None
        with pytest.raises(RuntimeError, match="already published or closed"):
            await feed.publish(pa.table({"x": [1]}))

        empty = PlanFeed(slots=4)
        await empty.close()
        assert await empty.take() is None

    asyncio.run(scenario())


def test_registry_timing_from_the_actors_reports() -> None:
    """`ActorRegistry.timing` in-process: OCR start-up points over all actors, the steady window
    over every page's (into the engine, finished) times, and CPU seconds by stage (the latest
    figure of each process, summed)."""
    from pipeline.metrics import ActorRegistry

    reg = ActorRegistry()
    reg.register("a", "cpu", 100.0, 103.0, {"process_start": 95.0, "init_start": 99.0})
    reg.register("b", "cpu", 101.0, 102.5, {"process_start": 90.0, "init_start": 99.5})
    for t in (96.0, 94.0, 97.0):  # three render actors up
        reg.point("render_actor_up_first", t)
        reg.point("render_actor_up_last", t, latest=True)
    # 20 pages, one a second from t=110 to 129, each 5 s in the engine: the last went in at 124
    done = [110.0 + i for i in range(20)]
    reg.beat("a", 120.0, 10, 104.0, [t - 5 for t in done[:10]], done[:10])
    reg.beat("b", 130.0, 10, 106.0, [t - 5 for t in done[10:]], done[10:])
    for key, seconds in (("p1", 1.0), ("p1", 2.5), ("p2", 1.5)):
        reg.cpu("render", key, seconds)
    reg.cpu("ocr", "p3", 7.0)
    t = reg.timing()
    assert (t["ocr_load_start"], t["ocr_ready"], t["first_page_into_ocr"]) == (100.0, 102.5, 104.0)
    assert (t["ocr_process_start"], t["ocr_init_start"]) == (90.0, 99.0)  # the earliest of each
    assert (t["render_actor_up_first"], t["render_actor_up_last"]) == (94.0, 97.0)
    assert t["last_page_into_ocr"] == 124.0
    assert t["steady"] == {"pages_per_s": 1.0, "window_s": 14.0, "pages": 14}
    assert t["stage_cpu_s"] == {"ocr": 7.0, "render": 4.0}
    assert reg.summary()["ocr_actors"] == 2
    # pages in the actors per 10 s from t0=100: batch a reached its actor at 104, batch b at 106;
    # page i went into the engine at 105 + i and finished at 110 + i
    occ = reg.timing(100.0)["occupancy"]
    assert [w["t_s"] for w in occ] == [10.0, 20.0, 30.0]
    # readings at 100.5 .. 109.5: in the engine 1, 2, 3, 4, 5 from 105.5 on; waiting: batch a's
    # pages from 104.5, b's (10 more) from 106.5, less those submitted
    assert occ[0]["in_engine"] == round((1 + 2 + 3 + 4 + 5) / 10, 1)
    assert occ[1]["in_engine"] == 5.0 and occ[2]["in_engine"] == round((5 * 5 + 4 + 3 + 2 + 1) / 10, 1)
    assert occ[0]["waiting"] > 0 and occ[2]["waiting"] == round((4 + 3 + 2 + 1) / 10, 1)


def test_render_pool_starts_all_but_the_headroom(monkeypatch: pytest.MonkeyPatch) -> None:
    """`preflight.render_pool`: (min, max) render actors for the CPUs Ray sees."""
    import pipeline.preflight as pf

    cfg = compose(["model=tiny_random"])
    for cpus, want in ((16, (13, 15)), (4, (1, 3)), (2, (1, 1)), (64, (61, 63))):
        monkeypatch.setattr(pf, "cpu_count", lambda c=cpus: c)
        assert pf.render_pool(cfg, 1) == want
    monkeypatch.setattr(pf, "cpu_count", lambda: 16)
    assert pf.render_pool(compose(["model=tiny_random", "ray.render_cpus=2"]), 1) == (6, 15)
