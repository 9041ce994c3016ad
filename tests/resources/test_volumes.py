"""katapy.resource.volumes.validate: the spec's mounts before anything is shared with the guest."""
from __future__ import annotations

import pytest

from katapy.resource.volumes import VolumeError, validate


def _bind(src, *options):
    return {"destination": "/data", "type": "bind", "source": str(src), "options": ["rbind", *options]}


def test_private_bind_mounts_pass(tmp_path):
    mounts = [_bind(tmp_path, "rprivate", "rw"), _bind(tmp_path, "ro")]
    assert validate(mounts) == mounts


@pytest.mark.parametrize("option,cri_name", [("rslave", "HostToContainer"), ("slave", "HostToContainer"),
                                             ("rshared", "Bidirectional"), ("shared", "Bidirectional")])
def test_propagation_from_the_host_is_refused_by_name(tmp_path, option, cri_name):
    with pytest.raises(VolumeError, match=f"mount propagation '{option}' \\(CRI {cri_name}\\) is not supported by "
                                          "katapy"):
        validate([_bind(tmp_path, option)])


def test_bad_shapes_and_missing_sources(tmp_path):
    with pytest.raises(VolumeError, match="must be a list"):
        validate({"destination": "/x"})
    with pytest.raises(VolumeError, match="has no destination"):
        validate([{"type": "bind", "source": str(tmp_path)}])
    with pytest.raises(VolumeError, match="does not exist"):
        validate([_bind(tmp_path / "gone")])
    with pytest.raises(VolumeError, match="not an absolute path"):
        validate([_bind("relative")])
