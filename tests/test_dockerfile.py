"""No Docker engine runs where the tests run, so the Dockerfile is checked as text."""

from __future__ import annotations

import re

from tests.conftest import ROOT

TEXT = (ROOT / "Dockerfile").read_text()
LINES = [line.strip() for line in TEXT.splitlines() if line.strip() and not line.startswith("#")]


def _instructions(name: str) -> list[str]:
    return [line for line in LINES if line.upper().startswith(name + " ")]


def test_official_pytorch_cuda_runtime_base() -> None:
    (base,) = _instructions("FROM")
    assert re.match(r"FROM pytorch/pytorch:\S+-cuda\S+-runtime$", base), base


def test_runs_as_a_non_root_user() -> None:
    users = _instructions("USER")
    assert users and users[-1].split()[1] not in ("root", "0")
    assert "useradd" in TEXT


def test_port_health_check_and_address() -> None:
    assert _instructions("EXPOSE") == ["EXPOSE 8501"]
    (health,) = _instructions("HEALTHCHECK")
    assert "/_stcore/health" in TEXT[TEXT.index("HEALTHCHECK") :]
    assert health.startswith("HEALTHCHECK")
    cmd = _instructions("CMD")[-1]  # the last CMD is the container's (one is the health check's)
    assert "--server.address=0.0.0.0" in cmd and "app/main.py" in cmd


def test_runs_volume_and_data_in_the_image() -> None:
    assert any("/runs" in v for v in _instructions("VOLUME"))
    assert "ROBUSTKD_RUNS=/runs" in TEXT
    assert "dataset-fashion-mnist" in TEXT
    assert "COPY assets" in TEXT  # the shipped teacher: the app starts with no download


def test_keeps_the_base_images_torch() -> None:
    # reinstalling torch from requirements.txt would replace the CUDA build with another one
    assert re.search(r"grep -v -E '\^\(torch\|torchvision", TEXT)


def test_readme_documents_build_and_run() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker build" in readme and "docker run --gpus all" in readme


def test_says_how_to_put_the_app_behind_authentication() -> None:
    # the app has no login: the image and the README say to keep the port on the loopback
    # address and put an authenticating reverse proxy (passing WebSockets) in front
    comments = "\n".join(line for line in TEXT.splitlines() if line.startswith("#"))
    assert "Authentication" in comments and "reverse proxy" in comments
    assert "-p 127.0.0.1:8501:8501" in comments
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Authentication.**") :]
    assert "127.0.0.1:8501" in section and "auth_basic" in section
    assert "proxy_set_header Upgrade" in section  # Streamlit needs its WebSocket through


def test_run_limit_and_upload_age_are_set_where_operators_look() -> None:
    assert "ROBUSTKD_MAX_RUNS=2" in TEXT and "ROBUSTKD_UPLOAD_DAYS=7" in TEXT
