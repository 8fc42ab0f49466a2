"""Prints every scalar of a TensorBoard log folder as JSON, read by
TensorBoard's own EventAccumulator: {tag: [[step, value], ...]} in the
order the reader keeps them (after it drops the points a SessionLog.START
orphans). Used by the Rust integration tests (tests/common::tensorboard).
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(logdir: str) -> None:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
