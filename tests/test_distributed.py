"""One global plan from many shards: torch.distributed (gloo, several processes) and JAX on several host devices."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from rdalloc import ExponentialModel, waterfill


def instance(n_items=10_000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.lognormal(0, 2, n_items), rng.uniform(1.5, 6.0, n_items), rng.integers(1, 200, n_items).astype(float),
            rng.uniform(0, 2, n_items))


def _rank_main(rank, world, port, backend_name, out):
    from rdalloc.distributed import TorchReducer
    from rdalloc.distributed import waterfill as dwaterfill

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    alpha, beta, n, w = instance()
    shard = np.array_split(np.arange(len(alpha)), world)[rank]  # uneven shards on purpose
    to = torch.asarray if backend_name == "torch" else np.asarray
    reducer = TorchReducer()
    r = dwaterfill(ExponentialModel(to(alpha[shard]), to(beta[shard])), to(n[shard]), average_bits=3.1,
                   weights=to(w[shard]), reducer=reducer)
    out[rank] = {"bits": np.asarray(r.bits).tolist(), "level": float(r.log_water_level),
                 "distortion": float(r.distortion), "iterations": int(r.iterations), "calls": reducer.calls,
                 "kkt": float(r.kkt_residual)}
    dist.destroy_process_group()


@pytest.mark.parametrize("world, backend_name", [(2, "numpy"), (3, "torch"), (4, "numpy")])
def test_torch_distributed_gives_the_single_process_plan(world, backend_name):
    alpha, beta, n, w = instance()
    ref = waterfill(ExponentialModel(alpha, beta), n, average_bits=3.1, weights=w)
    out = mp.get_context("spawn").Manager().dict()  # no fork: JAX may already run threads here
    port = 29500 + world + (10 if backend_name == "torch" else 0) + os.getpid() % 1000
    mp.start_processes(_rank_main, args=(world, port, backend_name, out), nprocs=world, start_method="spawn")
    bits = np.concatenate([out[r]["bits"] for r in range(world)])
    np.testing.assert_allclose(bits, ref.bits, rtol=0, atol=1e-12)
    for r in range(world):
        assert out[r]["level"] == pytest.approx(float(ref.log_water_level), rel=1e-14)
        assert out[r]["distortion"] == pytest.approx(float(ref.distortion), rel=1e-12)
        assert out[r]["calls"] == 4 + out[r]["iterations"] + 2  # a few scalars per collective, counted
        assert out[r]["kkt"] < 1e-9


def test_jax_sharded_items_give_the_single_device_plan():
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np, json
        jax.config.update("jax_enable_x64", True)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from rdalloc import ExponentialModel, waterfill, allocate
        rng = np.random.default_rng(0)
        N = 4096
        a, b, n, w = rng.lognormal(0, 2, N), rng.uniform(1.5, 6, N), rng.integers(1, 200, N) * 1.0, rng.uniform(0, 2, N)
        ev = a * rng.uniform(0.2, 3.0, N)
        mesh = Mesh(np.array(jax.devices()), ("items",))
        shard = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("items")))
        cont = jax.jit(lambda a, b, n, w: waterfill(ExponentialModel(a, b), n, average_bits=3.1, weights=w))
        menu = jax.jit(lambda a, b, e, n, w: allocate(ExponentialModel(a, b, eviction=e), n, average_bits=2.5,
                                                      weights=w, menu=(0, 1, 2, 3, 4, 6, 8, 16), metadata=32.0))
        rs, r1 = cont(*map(shard, (a, b, n, w))), cont(*map(jnp.asarray, (a, b, n, w)))
        ms, m1 = menu(*map(shard, (a, b, ev, n, w))), menu(*map(jnp.asarray, (a, b, ev, n, w)))
        print(json.dumps({"devices": len(rs.bits.sharding.device_set),
                          "cont_diff": float(jnp.max(jnp.abs(rs.bits - r1.bits))),
                          "menu_equal": bool(jnp.all(ms.bits == m1.bits)),
                          "menu_distortion": [float(ms.distortion), float(m1.distortion)]}))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["cont_diff"] <= 1e-12
    assert out["menu_equal"]
    assert out["menu_distortion"][0] == pytest.approx(out["menu_distortion"][1], rel=1e-12)
