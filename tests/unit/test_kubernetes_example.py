"""The Kubernetes examples, checked offline (no cluster here): the manifests parse, their failure
policy matches the exit codes of daemon/errors.py, the grace period covers a stop, and the config
they mount is one the trainer accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.ckpt.lease import RELEASE_WAIT_S
from daemon.config.sections import Config
from daemon.errors import ExitCode

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kubernetes"
MANIFESTS = sorted(EXAMPLES.glob("*.yaml"))
RETRY = {ExitCode.STOPPED}  # the emergency checkpoint is durable: a new pod resumes
NOT_FAILURES = {ExitCode.COMPLETE, ExitCode.FAILURE}  # done; or counted against backoffLimit
FAIL_JOB = set(ExitCode) - RETRY - NOT_FAILURES  # a person must act: retrying cannot help


def documents(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}


def test_there_are_examples():
    assert [path.name for path in MANIFESTS] == ["indexed-job.yaml", "job.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_the_failure_policy_matches_the_exit_codes(path):
    job = documents(path)["Job"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    by_action: dict[str, set[int]] = {}
    for rule in rules:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["operator"] == "In" and rule["onExitCodes"]["containerName"] == "trainer"
            by_action.setdefault(rule["action"], set()).update(rule["onExitCodes"]["values"])
    assert by_action == {"Ignore": {int(code) for code in RETRY}, "FailJob": {int(code) for code in FAIL_JOB}}
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_the_mounted_config_is_accepted_and_the_grace_period_covers_a_stop(path, tmp_path):
    docs = documents(path)
    pod = docs["Job"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["trainer", "run", "--config"]
    config_path = Path(container["command"][3])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    written = tmp_path / config_path.name
    written.write_text(docs["ConfigMap"]["data"][config_path.name])
    config = Config.from_yaml(written)

    assert config.checkpoint.remote, "a new pod may land on another node: the checkpoints must outlive this one"
    assert not any("secret" in key.lower() for key in config.flat()), "credentials come from a Secret"
    stop_budget = config.checkpoint.remote_stop_timeout_seconds + RELEASE_WAIT_S + 10  # + the save itself
    assert pod["terminationGracePeriodSeconds"] >= stop_budget


def test_the_indexed_job_meets_at_its_first_pod():
    docs = documents(EXAMPLES / "indexed-job.yaml")
    job, service = docs["Job"], docs["Service"]
    config_text = docs["ConfigMap"]["data"]["config.yaml"]
    dist = yaml.safe_load(config_text)["dist"]
    assert dist["nnodes"] == job["spec"]["completions"] == job["spec"]["parallelism"]
    host, port = dist["rdzv_endpoint"].rsplit(":", 1)
    subdomain = job["spec"]["template"]["spec"]["subdomain"]
    assert host == f"{job['metadata']['name']}-0.{subdomain}"  # an Indexed Job's pod 0, by its hostname
    assert service["metadata"]["name"] == subdomain and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert int(port) in {p["containerPort"] for p in container["ports"]}
