"""How the world of ranks splits into data-parallel replicas, FSDP shards and tensor-parallel groups.

The mesh is ``dp_replicate x dp_shard x tp`` (tp innermost, so a TP group is a set of neighbouring ranks,
on one host when ranks are laid out host by host). All three named dimensions always exist, size-1 ones
included, so ``mesh["tp"]`` or ``mesh["dp_replicate", "dp_shard"]`` work whatever the degrees; the flattened
``"dp"`` dimension (dp_replicate x dp_shard) is what the data loader and the loss reduction use.
With a world size of 1 no mesh is built and nothing needs a process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIM_NAMES = ("dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    """Degrees of each parallelism; ``-1`` on one of them means "whatever the world size leaves"."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _flat_dp_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    device_type: str | None = field(default=None, init=False)  # set by build_mesh, also for world size 1

    def __post_init__(self) -> None:
        degrees = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        bad = {k: v for k, v in degrees.items() if v == 0 or v < -1}
        if bad:
            raise ValueError(
                "parallelism degrees must be positive or -1 (the rest of the world size); got "
                + ", ".join(f"parallelism.{k}={v}" for k, v in bad.items())
            )
        rest = [k for k, v in degrees.items() if v == -1]
        if len(rest) > 1:
            raise ValueError(
                f"only one of parallelism.dp_replicate / dp_shard / tp may be -1, got -1 for "
                f"{', '.join('parallelism.' + k for k in rest)}"
            )
        fixed = 1
        for k, v in degrees.items():
            if v != -1:
                fixed *= v
        if rest:
            if self.world_size % fixed != 0:
                raise ValueError(
                    f"cannot resolve parallelism.{rest[0]}=-1: the other degrees multiply to {fixed}, "
                    f"which does not divide the world size {self.world_size}; change "
                    f"{', '.join('parallelism.' + k for k in degrees if k != rest[0])} or the number of ranks"
                )
            setattr(self, rest[0], self.world_size // fixed)
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ValueError(
                f"parallelism.dp_replicate ({self.dp_replicate}) x parallelism.dp_shard ({self.dp_shard}) x "
                f"parallelism.tp ({self.tp}) = {product}, but the world size is {self.world_size}; "
                f"set the degrees so their product equals the number of ranks (use -1 for one of them)"
            )

    @classmethod
    def from_config(cls, section, world_size: int) -> "ParallelDims":
        """From a ``ParallelismSection`` (anything with dp_replicate, dp_shard, tp)."""
        return cls(dp_replicate=section.dp_replicate, dp_shard=section.dp_shard, tp=section.tp, world_size=world_size)

    # ---- which parallelisms are on ----
    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 is applied whenever there is any data parallelism (dp_shard=1 with replicas is plain DDP)."""
        return self.dp_degree > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def dp_degree(self) -> int:
        """Number of data-parallel ranks: each sees different rows of the batch."""
        return self.dp_replicate * self.dp_shard

    # ---- mesh ----
    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Create (once) the world mesh; ``None`` for a world size of 1. Needs the default process group."""
        self.device_type = device_type
        if self.world_size == 1:
            return None
        if self.mesh is None:
            mesh = init_device_mesh(
                device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=MESH_DIM_NAMES
            )
            # kept here: slicing a flattened dimension from the root mesh is deprecated
            self._flat_dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
            self.mesh = mesh
        return self.mesh

    def _submesh(self, *names: str) -> DeviceMesh | None:
        if self.mesh is None:
            if self.world_size > 1:
                raise RuntimeError("call ParallelDims.build_mesh(device_type) before asking for sub-meshes")
            return None
        return self.mesh[names[0]] if len(names) == 1 else self.mesh[names]

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """1-D mesh of this rank's tensor-parallel group, or None when TP is off."""
        return self._submesh("tp") if self.tp_enabled else None

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """Mesh for ``fully_shard``: 1-D ``dp_shard``, or 2-D ``(dp_replicate, dp_shard)`` for HSDP; None when off."""
        if not self.fsdp_enabled:
            return None
        if self.hsdp_enabled:
            return self._submesh("dp_replicate", "dp_shard")
        return self._submesh("dp_shard")

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """Flattened 1-D data-parallel mesh (for the loss / token-count reduction), None when dp_degree is 1."""
        if self.dp_degree == 1:
            return None
        if self._flat_dp_mesh is None:
            raise RuntimeError("call ParallelDims.build_mesh(device_type) before asking for sub-meshes")
        return self._flat_dp_mesh

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which slice of the global batch it reads)."""
        mesh = self.dp_mesh
        return 0 if mesh is None else mesh.get_local_rank()

    @property
    def tp_rank(self) -> int:
        mesh = self.tp_mesh
        return 0 if mesh is None else mesh.get_local_rank()
