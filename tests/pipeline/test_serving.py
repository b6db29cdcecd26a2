"""Ray patch serving: routed, batched reads equal direct PatchReader reads; a killed server restarts and no request
is lost or answered with another image's data."""
from __future__ import annotations

from collections.abc import Iterator

import dask.array as da
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from pipeline.errors import IncompleteImageError  # noqa: E402
from pipeline.pyramid import write_pyramid  # noqa: E402
from pipeline.reader import PatchReader  # noqa: E402
from pipeline.serving import PatchClient, PatchServer, ServerOptions, route, start_servers  # noqa: E402

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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="gats-tests")
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
    (idx, image_id, patches), = server.read_many([(7, "img1", boxes, 0)])
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
    assert sum(s.requests for s in client.stats()) > 0
    # The same names attach to the same actors (how training workers share the servers).
    again = start_servers(data_root, 2, ServerOptions(name_prefix="match"))
    assert [a._actor_id for a in again] == [a._actor_id for a in client.servers]


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
