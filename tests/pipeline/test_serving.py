"""Ray patch serving: routed, batched reads equal direct PatchReader reads; the non-blocking submit / wait_any / result
API reassembles answers in request order and refuses answers that do not match what was sent; a killed server
restarts and no request is lost or answered with another image's data."""
from __future__ import annotations

from collections.abc import Iterator

import dask.array as da
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from pipeline.errors import IncompleteImageError  # noqa: E402
from pipeline.pyramid import write_pyramid  # noqa: E402
from pipeline.reader import PatchReader  # noqa: E402
from pipeline.serving import (  # noqa: E402
    PatchClient,
    PatchServer,
    PendingRead,
    ServerOptions,
    route,
    start_servers,
)

pytestmark = pytest.mark.ray
IDS = [f"img{i}" for i in range(6)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("serving"))
    for i, image_id in enumerate(IDS):
        x = np.random.default_rng(i).integers(0, 256, (3, 96 + 8 * i, 80), dtype=np.uint8)
        write_pyramid(root, image_id, da.from_array(x), chunk=32, min_size=32)
    return root


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="gats-tests")
    try:
        yield
    finally:
        ray.shutdown()


def _steps(n_steps: int, seed: int = 0) -> list[list[tuple[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n_steps):
        ids = rng.choice(IDS, size=4, replace=False)
        steps.append([(str(i), np.c_[rng.integers(-20, 120, (3, 2)), np.full((3, 2), 24)]) for i in ids])
    return steps


def test_plain_server_class_without_ray(data_root: str) -> None:
    server = PatchServer(data_root)
    boxes = np.array([[0, 0, 8, 8]])
    (idx, image_id, patches), = server.read_many([(7, "img1", boxes, 0, None)])
    assert (idx, image_id) == (7, "img1")
    np.testing.assert_array_equal(patches, PatchReader(data_root).read("img1", boxes))


def test_route_is_stable_and_spreads() -> None:
    assert [route(i, 3) for i in IDS] == [route(i, 3) for i in IDS]
    assert len({route(f"x{i}", 3) for i in range(50)}) == 3


def test_client_matches_direct_reads(data_root: str, ray_session: None) -> None:
    client = PatchClient.start(data_root, 2, options=ServerOptions(name_prefix="match"), max_in_flight=2)
    direct = PatchReader(data_root)
    for step in _steps(3):
        got = client.read(step)
        for (image_id, boxes), patches in zip(step, got):
            np.testing.assert_array_equal(patches, direct.read(image_id, boxes))
    np.testing.assert_array_equal(client.low_res("img2", 1), direct.low_res("img2", 1))
    assert client.info("img3") == direct.info("img3")
    got = client.read([("img0", [[0, 0, 16, 16]], 1), ("img0", [[0, 0, 16, 16]])])
    assert got[0].shape == (1, 3, 8, 8) and got[1].shape == (1, 3, 16, 16)
    # (image_id, boxes, level, out_hw): read at the level, resampled on the server (training's patch frames)
    boxes = [[4, 4, 30, 30], [40, 8, 30, 30]]
    got = client.read([("img2", boxes, 1, (12, 12)), ("img4", boxes, 0, (24, 24))])
    np.testing.assert_array_equal(got[0], direct.read("img2", boxes, 1, (12, 12)))
    np.testing.assert_array_equal(got[1], direct.read("img4", boxes, 0, (24, 24)))
    assert got[0].shape == (2, 3, 12, 12) and got[1].shape == (2, 3, 24, 24)
    assert sum(s.requests for s in client.stats()) > 0
    # The same names attach to the same actors (how training workers share the servers).
    again = start_servers(data_root, 2, ServerOptions(name_prefix="match"))
    assert [a._actor_id for a in again] == [a._actor_id for a in client.servers]


def test_submit_one_pending_read_per_server(data_root: str, ray_session: None) -> None:
    client = PatchClient.start(data_root, 3, options=ServerOptions(name_prefix="api-route"))
    requests = [(image_id, [[0, 0, 8, 8]]) for image_id in IDS + IDS[::-1]]
    pending = client.submit(requests)
    servers = sorted({route(image_id, 3) for image_id, _ in requests})
    assert len(servers) >= 2 and len(pending) == len(servers)  # one read_many call per server holding an image
    for server, p in zip(servers, pending):
        assert p.indices == tuple(i for i, (image_id, _) in enumerate(requests) if route(image_id, 3) == server)
        assert p.image_ids == tuple(requests[i][0] for i in p.indices)
    assert sorted(i for p in pending for i in p.indices) == list(range(len(requests)))
    for p in pending:
        assert [idx for idx, _ in client.result(p)] == list(p.indices)


def test_submit_wait_any_result_reassemble_in_request_order(data_root: str, ray_session: None) -> None:
    client = PatchClient.start(data_root, 2, options=ServerOptions(name_prefix="api-order"))
    direct = PatchReader(data_root)
    requests = [*_steps(2, seed=2)[0], *_steps(2, seed=3)[1], ("img4", [[0, 0, 16, 16]], 1)]
    pending = client.submit(requests)
    assert len(pending) == 2
    arrived: list[tuple[int, np.ndarray]] = []
    rest = list(pending)
    while rest:
        ready, after = client.wait_any(rest)
        assert ready and after == [p for p in rest if p not in ready]  # rest keeps submission order
        rest = after
        for p in ready:
            arrived += client.result(p)
    assert sorted(idx for idx, _ in arrived) == list(range(len(requests)))
    by_index = dict(arrived)
    in_reverse = [part for p in reversed(pending) for part in client.result(p)]  # answers taken out of order
    assert [idx for idx, _ in in_reverse] != list(range(len(requests)))
    for idx, patches in in_reverse:
        np.testing.assert_array_equal(patches, by_index[idx])
    for idx, (image_id, boxes, *level) in enumerate(requests):
        np.testing.assert_array_equal(by_index[idx], direct.read(image_id, np.asarray(boxes), *level))
    assert by_index[len(requests) - 1].shape == (1, 3, 8, 8)  # the request's own level (1), not submit's (0)
    with pytest.raises(ValueError, match="at least one"):
        client.wait_any([])


@pytest.mark.parametrize("answer, match", [
    ([(0, "img0", "x"), (1, "img2", "x")], "request 1 \\('img1'\\) was answered as request 1 \\('img2'\\)"),
    ([(1, "img1", "x"), (0, "img0", "x")], "request 0 \\('img0'\\) was answered as request 1"),
    ([(0, "img0", "x")], "1 answers to 2 requests"),
])
def test_result_refuses_a_tampered_answer(ray_session: None, answer: list, match: str) -> None:
    patches = np.zeros((1, 3, 8, 8), np.uint8)
    tampered = PendingRead((0, 1), ("img0", "img1"), ray.put([(i, image_id, patches) for i, image_id, _ in answer]))
    with pytest.raises(RuntimeError, match=f"{match}.*bug in pipeline.serving"):
        PatchClient.result(tampered)


def test_errors_are_typed_through_ray(data_root: str, ray_session: None, tmp_path) -> None:  # noqa: ANN001
    import zarr

    from pipeline.storage import Storage, image_key

    zarr.open_group(Storage(str(tmp_path)).zarr_store(image_key("part")), mode="w", zarr_format=3)
    client = PatchClient.start(str(tmp_path), 1, options=ServerOptions(name_prefix="errors"))
    with pytest.raises(IncompleteImageError):
        client.read([("part", [[0, 0, 4, 4]])])


def test_kill_server_mid_stream(data_root: str, ray_session: None) -> None:
    client = PatchClient.start(data_root, 2, options=ServerOptions(name_prefix="kill"), max_in_flight=3)
    direct = PatchReader(data_root)
    steps = _steps(12, seed=1)
    pids = ray.get([s.ping.remote() for s in client.servers])
    results = []
    for k, got in enumerate(client.read_steps(steps)):
        results.append(got)
        if k in (2, 5):  # kills server 0, then server 1, while later steps are in flight
            ray.kill(client.servers[k % 2], no_restart=False)
    assert len(results) == len(steps)
    for step, got in zip(steps, results):
        for (image_id, boxes), patches in zip(step, got):
            np.testing.assert_array_equal(patches, direct.read(image_id, boxes))  # by content, per request
    assert client.read(steps[0])[0].shape == (3, 3, 24, 24)  # both servers answer after the restarts
    new_pids = ray.get([s.ping.remote() for s in client.servers])
    assert all(a != b for a, b in zip(pids, new_pids))  # both really died and came back
