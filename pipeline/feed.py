"""The plan feed: the processing dataset starts before discovery and planning have finished.

The OCR actors load the model and allocate their KV pool as soon as the streaming executor
starts, so the driver starts it first (`pipeline.stages.process` over a `PlanFeed`), then
discovers and plans, then publishes the task rows. The dataset's read side is `SLOTS` read tasks;
each one waits for the plan, takes the next chunk of task rows (about 1/SLOTS of the plan, at
least one row) and returns it as one block, or an empty block once the plan is used up. So a
published plan streams into the render stage as at most SLOTS blocks, as the old
`from_arrow(...).repartition(...)` did, and an empty plan (or a discovery that failed: the driver
closes the feed on every path) ends the dataset at once, with no page sent to an OCR actor.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa
from ray.data import Datasource

SLOTS = 256  # read tasks: the most blocks a plan is cut into (chunks of >= 1 task row)
READ_CONCURRENCY = 4  # read tasks waiting on the feed at once (each holds a worker process, no CPU)


class PlanFeed:
    """A small async Ray actor (no CPU) holding the run's task rows once they are published."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self.tasks: pa.Table | None = None
        self.chunk = 1
        self.pos = 0
        self._ready: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._ready is None:  # made on the actor's event loop
            self._ready = asyncio.Event()
        return self._ready

    async def publish(self, tasks: pa.Table) -> None:
        """The plan's task rows (WORK_SCHEMA); once only, and not after `close`."""
        if self._event().is_set():
            raise RuntimeError("the plan feed is already published or closed")
        self.tasks = tasks
        self.chunk = max(1, -(-tasks.num_rows // self.slots))
        self._event().set()

    async def close(self) -> None:
        """No (more) rows: an empty plan, a failed discovery, or the end of the run. Idempotent."""
        self._event().set()

    async def take(self) -> pa.Table | None:
        """The next chunk of task rows, waiting until the plan is published; None when used up."""
        await self._event().wait()
        if self.tasks is None or self.pos >= self.tasks.num_rows:
            return None
        out = self.tasks.slice(self.pos, self.chunk)
        self.pos += self.chunk
        return out


def start_feed(slots: int = SLOTS) -> Any:
    """A `PlanFeed` actor on the driver's node (a worker node leaving must not take it along)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(PlanFeed).options(scheduling_strategy=here).remote(slots)


def read_feed(feed: Any, slots: int = SLOTS) -> Any:
    """The Ray Data dataset of the task rows `feed` gets (`SLOTS` read tasks, no CPU each)."""
    import ray

    return ray.data.read_datasource(
        FeedSource(feed, slots), override_num_blocks=slots, concurrency=READ_CONCURRENCY, num_cpus=0
    )


class FeedSource(Datasource):
    """`slots` read tasks over a `PlanFeed`: each takes one chunk (an empty block once used up)."""

    def __init__(self, feed: Any, slots: int) -> None:
        super().__init__()
        self.feed, self.slots = feed, slots

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, **_: Any) -> list[Any]:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        feed = self.feed

        def read() -> list[pa.Table]:
            import ray

            from pipeline.stages import WORK_SCHEMA

            chunk = ray.get(feed.take.remote())
            return [chunk if chunk is not None else WORK_SCHEMA.empty_table()]

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(read, meta) for _ in range(self.slots)]
