"""The device mesh ('data', 'fsdp', 'tensor') and the logical-axis rules that shard params.

A parameter's `logical_axes` metadata names each dimension; `RULES` maps a name to a mesh
axis. A dimension that the mesh axis does not divide, or whose mesh axis an earlier
dimension already took, is replicated instead.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nvium_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# logical axis → mesh axis (None = replicated)
RULES: dict[str, Optional[str]] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "adapter": "tensor",
    "router": None,
}


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Axis sizes with -1 resolved to the devices left over; a clear error if impossible."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh data={mesh_cfg.data}, fsdp={mesh_cfg.fsdp}, tensor={mesh_cfg.tensor}: "
                f"{n_devices} devices are not divisible by {known}; choose sizes whose product divides {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {n_devices} are available; set the mesh sizes so their product is {n_devices} "
            f"(or use -1 for one axis)"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # unusual topologies: plain order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axis = RULES.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis if mesh.shape[mesh_axis] > 1 else None)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh) -> dict:
    """A pure dict (the layout of `nnx.to_pure_dict(state)`) of NamedShardings."""
    shardings: dict = {}
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("logical_axes")
        shape = variable.get_value().shape
        if axes is None:
            axes = (None,) * len(shape)
        node = shardings
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = NamedSharding(mesh, logical_spec(axes, shape, mesh))
    return shardings


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Sharding of a token batch whose batch dimension follows `leading` unsplit axes."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
