"""The megatron-core version gate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dms_megatron.megatron.compat import SUPPORTED_MEGATRON_CORE, MegatronVersionError, check_megatron_version


def test_supported_version_passes():
    assert check_megatron_version("0.19.2") == "0.19.2"
    assert "0.19.2" in SUPPORTED_MEGATRON_CORE


@pytest.mark.parametrize("bad", ["0.18.2", "0.19.1", "0.20.0rc1"])
def test_unsupported_version_names_installed_and_supported(bad):
    with pytest.raises(MegatronVersionError) as err:
        check_megatron_version(bad)
    msg = str(err.value)
    assert bad in msg and "0.19.2" in msg and "pip install megatron-core==0.19.2" in msg


def test_missing_megatron_core(monkeypatch):
    import dms_megatron.megatron.compat as compat

    monkeypatch.setattr(compat, "installed_megatron_core_version", lambda: None)
    with pytest.raises(MegatronVersionError, match="not installed"):
        compat.check_megatron_version()


def test_import_of_megatron_layer_runs_the_check_on_the_real_install():
    code = "import dms_megatron.megatron as m; print(m.MEGATRON_CORE_VERSION)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.19.2"
