"""Searches running while another thread writes see a whole state, never a torn one."""

from __future__ import annotations

import threading

import numpy as np

from leanclip import Index

DIM = 24


def vector_of(key: int) -> np.ndarray:
    return np.random.default_rng(key).standard_normal(DIM).astype(np.float32)


def top_keys(keys: list[int], query: np.ndarray, k: int) -> tuple:
    data = np.stack([vector_of(key) for key in keys])
    scores = data.astype(np.float64) @ query.astype(np.float64)
    order = np.lexsort((np.array(keys), -scores))[:k]
    return tuple(int(keys[i]) for i in order)


def test_four_searchers_and_one_writer_agree_with_a_state_before_or_after_each_write():
    base = list(range(1000, 1600))
    batches = [list(range(5000 + 40 * i, 5040 + 40 * i)) for i in range(12)]
    # The writer's plan: add a batch, then remove every other key of the previous one.
    states = [sorted(base)]
    plan = []
    current = set(base)
    for i, batch in enumerate(batches):
        plan.append(("add", batch))
        current |= set(batch)
        states.append(sorted(current))
        if i:
            gone = batches[i - 1][::2]
            plan.append(("remove", gone))
            current -= set(gone)
            states.append(sorted(current))
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    # The exact answer to every query in every state (batched queries = one result per row).
    expected = [[top_keys(state, q, 10) for q in queries] for state in states]

    index = Index(DIM, "ip")
    index.add(base, np.stack([vector_of(k) for k in base]))
    version = [0]
    failures: list[str] = []
    done = threading.Event()

    def writer():
        try:
            for op, keys in plan:
                if op == "add":
                    index.add(keys, np.stack([vector_of(k) for k in keys]))
                else:
                    assert index.remove(keys) == len(keys)
                version[0] += 1
        except Exception as exc:  # surfaced by the main thread
            failures.append(f"writer: {exc!r}")
        finally:
            done.set()

    def searcher(seed: int):
        local = np.random.default_rng(seed)
        searches = 0
        while not done.is_set() or searches < 20:
            before = version[0]
            if local.random() < 0.5:
                qi = int(local.integers(len(queries)))
                got_keys, _ = index.search(queries[qi], k=10)
                results = [(qi, tuple(int(k) for k in got_keys))]
            else:
                got_keys, _ = index.search(queries, k=10)
                results = [(qi, tuple(int(k) for k in row)) for qi, row in enumerate(got_keys)]
            after = version[0]
            # a write may finish just before its version bump: allow one state past `after`
            window = range(before, min(after + 1, len(states) - 1) + 1)
            # all rows of one batched search come from the same state
            if not any(all(expected[v][qi] == got for qi, got in results) for v in window):
                failures.append(f"search {results[0]} matches no state in {list(window)}")
            searches += 1

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures[:3]
    assert version[0] == len(plan)
    assert sorted(index.keys().tolist()) == states[-1]
