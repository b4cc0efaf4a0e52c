"""infra/ cannot be started here (no container engine), so its files are parsed and cross-checked."""

import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def prefect_yaml():
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


@lru_cache(maxsize=None)
def cli_help(*cmd: str) -> str:
    return subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120).stdout


def _flags(command: list[str]) -> list[str]:
    return [part for part in command if part.startswith("--")]


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"service {name}: image {image} is not pinned to a version"


def test_stack_has_the_shared_services(compose):
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker"} <= set(compose["services"])
    prefect_db = compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and "@postgres:5432/" in prefect_db


def test_ports_line_up(compose):
    services = compose["services"]
    assert "4200:4200" in services["prefect-server"]["ports"]
    assert "5000:5000" in services["mlflow"]["ports"]
    worker_env = services["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker_env["AWS_ENDPOINT_URL"] == "http://minio:9000" and "9000:9000" in services["minio"]["ports"]
    mlflow_cmd = services["mlflow"]["command"]
    assert mlflow_cmd[mlflow_cmd.index("--port") + 1] == "5000"
    assert mlflow_cmd[mlflow_cmd.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert mlflow_cmd[mlflow_cmd.index("--artifacts-destination") + 1].startswith("s3://")


def test_environment_variable_names_are_the_ones_clients_read(compose):
    known = {"AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_DEFAULT_REGION", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "POSTTRAIN_HOME", "POSTTRAIN_PROJECT_DIR"}
    assert set(compose["services"]["worker"]["environment"]) <= known
    assert set(compose["services"]["mlflow"]["environment"]) <= known


def test_no_secret_is_written_into_the_compose_file():
    text = (INFRA / "compose.yaml").read_text()
    for match in re.finditer(r"(PASSWORD|SECRET_ACCESS_KEY)\W*:\s*(\S+)", text):
        assert match.group(2).startswith("${"), f"{match.group(0)} must come from the environment"


def test_commands_exist_in_the_installed_clis(compose):
    services = compose["services"]
    assert set(_flags(services["mlflow"]["command"])) <= set(re.findall(r"--[a-z-]+", cli_help("mlflow", "server")))
    prefect_cmd = services["prefect-server"]["command"]
    assert prefect_cmd[:3] == ["prefect", "server", "start"]
    assert set(_flags(prefect_cmd)) <= set(re.findall(r"--[a-z-]+", cli_help("prefect", "server", "start")))
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[:3] == ["prefect", "worker", "start"]
    assert set(_flags(worker_cmd)) <= set(re.findall(r"--[a-z-]+", cli_help("prefect", "worker", "start")))


def test_prefect_yaml_deployments_point_at_real_flows_and_pools(prefect_yaml, compose):
    import importlib

    pools = {d["work_pool"]["name"] for d in prefect_yaml["deployments"]}
    worker_cmd = compose["services"]["worker"]["command"]
    assert worker_cmd[worker_cmd.index("--pool") + 1] in pools
    for deployment in prefect_yaml["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        assert (ROOT / path).exists(), deployment["entrypoint"]
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, name), "deploy"), f"{deployment['entrypoint']} is not a Prefect flow"
        if name == "run_stage_flow":  # the pipeline looks stage deployments up as posttrain-stage/<pool>
            assert deployment["name"] == deployment["work_pool"]["name"]
        for schedule in deployment.get("schedules", []):
            from prefect.schedules import Cron

            Cron(schedule["cron"], timezone=schedule["timezone"])
    assert prefect_yaml["prefect-version"] == __import__("prefect").__version__


def test_worker_image_puts_the_project_where_the_pull_step_looks(prefect_yaml):
    dockerfile = (INFRA / "Dockerfile").read_text()
    [step] = prefect_yaml["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $POSTTRAIN_PROJECT_DIR }}"
    assert "ENV POSTTRAIN_PROJECT_DIR=/opt/posttrain" in dockerfile and "WORKDIR /opt/posttrain" in dockerfile
    assert "torch==2.13.0" in dockerfile


def test_kubernetes_job_template_requests_gpus_and_declares_its_variables():
    template = json.loads((INFRA / "k8s-gpu-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= declared, f"undeclared template variables: {used - declared}"
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["gpus"]["default"] >= 1
    for name, prop in template["variables"]["properties"].items():
        assert prop.get("description"), name


@pytest.fixture(scope="module")
def raycluster():
    return yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())


def _containers(raycluster):
    groups = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
    return [(group, c) for group in groups for c in group["template"]["spec"]["containers"]]


def test_kuberay_cluster_runs_the_pinned_ray_in_the_ray_image(raycluster):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert raycluster["spec"]["rayVersion"] == pinned, "the cluster's Ray is the one the [ray] extra installs"
    assert re.search(r"^FROM worker AS ray$", (INFRA / "Dockerfile").read_text(), re.M)
    assert '".[ray]"' in (INFRA / "Dockerfile").read_text().split("AS ray", 1)[1]
    for _, container in _containers(raycluster):
        assert container["image"].startswith("posttrain-ray:"), container["image"]
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001}  # GCS, dashboard, Ray Client


def test_kuberay_gpu_workers_ask_kubernetes_for_the_gpus_they_tell_ray_about(raycluster):
    for group in raycluster["spec"]["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", "0")
        assert group["rayStartParams"].get("num-gpus", "0") == gpus
        assert container["resources"]["requests"].get("nvidia.com/gpu", "0") == gpus
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_credentials_come_from_a_secret_never_from_the_manifest(raycluster):
    for _, container in _containers(raycluster):
        assert {"secretRef": {"name": "posttrain-credentials"}} in container["envFrom"]
        for variable in container.get("env", []):
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN|TRACKING_URI", variable["name"]), variable


def test_the_documented_ray_example_is_a_valid_orchestration_section():
    from flows.config import OrchestrationConfig

    guide = (ROOT / "docs" / "guides" / "servers.md").read_text()
    example = re.search(r"```yaml\n(# orchestration on a Ray cluster.*?)```", guide, re.S)
    assert example, "docs/guides/servers.md: the Ray cluster example"
    section = yaml.safe_load(example.group(1))["orchestration"]
    settings = OrchestrationConfig.model_validate(section)
    assert settings.engine == "ray" and settings.ray.address.startswith("ray://posttrain-ray-head-svc:10001")
    assert settings.ray_settings("sft")["gpus_per_worker"] >= 1
