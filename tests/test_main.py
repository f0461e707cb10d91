"""The absl entry point: config files with args, overrides, mode and multi-host flag checks.

(Training through main end to end is in test_train_loop.py.)
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "pixcon_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_unknown_mode_is_a_usage_error(tmp_path):
  p = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
            "--config.mode=bogus", "--config.contrast.mining=hardest")
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
      "error: config.mode='bogus': expected one of train, eval, predict")
  # The process and device counts are logged before dispatching.
  assert "process 0 of 1" in p.stderr


def test_coordinator_address_needs_process_flags(tmp_path):
  p = _main("--config=configs/demo.py", f"--workdir={tmp_path}",
            "--coordinator_address=127.0.0.1:1234")
  assert p.returncode != 0
  assert "--coordinator_address needs --num_processes and --process_id" in p.stdout + p.stderr


def test_config_arg_variants_and_overrides_are_parsed(tmp_path):
  # An unknown config arg fails while loading the config file, before any JAX work.
  p = _main("--config=configs/cityscapes_hrnet.py:runlokal", f"--workdir={tmp_path}")
  assert p.returncode != 0 and "unknown config arg" in p.stderr


def test_batch_size_error_names_the_config_key(tmp_path):
  p = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
            "--config.data.batch_size=0")
  assert p.returncode != 0 and "config.data.batch_size=0" in p.stderr


def _logged_environment(stderr: str) -> tuple[str, str]:
  """(GLIBC_TUNABLES, XLA_FLAGS) as main logs them on its JAX line."""
  m = re.search(r"GLIBC_TUNABLES=(.*?); XLA_FLAGS=(.*)$", stderr, re.M)
  assert m, stderr[-2000:]
  return m.group(1), m.group(2).strip()


def test_restarts_itself_with_huge_pages_for_malloc_and_tuned_xla_flags(tmp_path):
  from pixcon_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
  from pixcon_jax.cpu import xla_flags as xla_cpu  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("GLIBC_TUNABLES", None)
  want = host_memory.hugepage_environment(env, glibc=host_memory._glibc_version(),
                                          thp_setting=host_memory._thp_setting())
  p = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}", "--config.mode=bogus")
  assert p.returncode != 0 and "process 0 of 1" in p.stderr
  expect = want["GLIBC_TUNABLES"] if want else ""  # this machine decides which one
  tunables, xla_flags = _logged_environment(p.stderr)
  assert tunables == expect
  # The tuned flags survive the huge-page restart (set in os.environ before it).
  for flag in xla_cpu.TUNED:
    assert xla_flags.split().count(flag) == 1, xla_flags
  p = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}", "--config.mode=bogus",
            "--nohugepages", "--notune_xla_cpu")
  tunables, xla_flags = _logged_environment(p.stderr)
  assert tunables == "" and xla_cpu.YNN_FUSION_FLAG not in xla_flags
  assert xla_cpu.SCHEDULER_FLAG not in xla_flags


def test_tuned_flag_decisions(monkeypatch):
  from pixcon_jax.cpu import xla_flags as xla_cpu  # pylint: disable=g-import-not-at-top
  both = f"{xla_cpu.EIGEN_DOTS} {xla_cpu.SEQUENTIAL_SCHEDULE}"
  assert xla_cpu.tuned_flags({}) == both
  assert xla_cpu.tuned_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                              "JAX_PLATFORMS": "cpu"}) == (
                                  "--xla_force_host_platform_device_count=8 " + both)
  # A flag the user set is theirs; the other one is still added.
  user_dots = f"{xla_cpu.YNN_FUSION_FLAG}="
  assert xla_cpu.tuned_flags({"XLA_FLAGS": user_dots}) == (
      f"{user_dots} {xla_cpu.SEQUENTIAL_SCHEDULE}")
  user_schedule = f"{xla_cpu.SCHEDULER_FLAG}=true"
  assert xla_cpu.tuned_flags({"XLA_FLAGS": user_schedule}) == (
      f"{user_schedule} {xla_cpu.EIGEN_DOTS}")
  for environ in ({"XLA_FLAGS": f"{user_dots} {user_schedule}"},  # the user's own choices
                  {"XLA_FLAGS": both},  # decided already
                  {"JAX_PLATFORMS": "tpu"}):  # no CPU compiles
    assert xla_cpu.tuned_flags(environ) is None, environ
  environ = {"XLA_FLAGS": both}
  assert not xla_cpu.use_tuned_flags(environ) and environ == {"XLA_FLAGS": both}


def test_hugepage_environment_decisions():
  from pixcon_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
  thp = "always [madvise] never\n"
  env = host_memory.hugepage_environment({"PATH": "/bin"}, glibc=(2, 36), thp_setting=thp)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = host_memory.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                         glibc=(2, 36), thp_setting=thp)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  for environ, glibc, setting in (
      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), thp),  # opted out / decided
      ({}, (2, 31), thp),  # glibc too old for the tunable
      ({}, None, thp),  # musl and others
      ({}, (2, 36), "always madvise [never]\n"),  # huge pages off
      ({}, (2, 36), ""),  # no THP at all
      ({"JAX_PLATFORMS": "tpu"}, (2, 36), thp),  # host malloc is not the step's memory
  ):
    assert host_memory.hugepage_environment(environ, glibc=glibc, thp_setting=setting) is None


def test_accelerator_plugins_are_found_as_jax_finds_them(tmp_path, monkeypatch):
  from pixcon_jax.cpu import xla_flags as xla_cpu  # pylint: disable=g-import-not-at-top
  # A CUDA plugin is a module of the `jax_plugins` namespace package; TPUs need `libtpu`.
  (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("raise ImportError\n")
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "__init__.py").write_text("raise ImportError\n")  # Never imported.
  monkeypatch.syspath_prepend(str(tmp_path))
  found = xla_cpu.installed_accelerator_plugins()
  assert "xla_cuda12" in found and "libtpu" in found, found


def test_installed_plugins_count_only_with_their_hardware():
  from pixcon_jax.cpu import xla_flags as xla_cpu  # pylint: disable=g-import-not-at-top
  usable = xla_cpu.usable_accelerator_plugins
  installed = ["libtpu", "xla_cuda12", "xla_rocm"]
  assert usable(installed, []) == []  # The [aot] extra on a CPU host: JAX runs on the CPU.
  assert usable(installed, ["/dev/nvidia0", "/dev/nvidiactl"]) == ["xla_cuda12"]
  assert usable(installed, ["/dev/vfio/0"]) == ["libtpu"]
  assert usable(installed, ["/dev/accel3", "/dev/kfd"]) == ["libtpu", "xla_rocm"]
  assert usable(["some_vendor"], []) == ["some_vendor"]  # Unknown kind: never tuned against.
  assert xla_cpu.tuned_flags({}, usable(installed, [])) is not None
  assert xla_cpu.tuned_flags({}, usable(installed, ["/dev/accel0"])) is None


def test_device_files_are_found(tmp_path):
  from pixcon_jax.cpu import xla_flags as xla_cpu  # pylint: disable=g-import-not-at-top
  for name in ("nvidia0", "nvidiactl", "accel1", "null", "vfio/7", "vfio/vfio"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("")
  assert xla_cpu.accelerator_device_files(str(tmp_path)) == [
      str(tmp_path / n) for n in ("accel1", "nvidia0", "vfio/7")]


@pytest.mark.parametrize("plugins,device", [(["xla_cuda12"], "/dev/nvidia0"),
                                            (["xla_cuda13"], "/dev/nvidia3"),
                                            (["libtpu"], "/dev/accel0"),
                                            (["libtpu"], "/dev/vfio/1")])
def test_gpu_and_tpu_hosts_are_neither_restarted_nor_given_cpu_flags(plugins, device,
                                                                     monkeypatch):
  from pixcon_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
  from pixcon_jax.cpu import xla_flags as xla_cpu  # pylint: disable=g-import-not-at-top
  # A host where the restart would happen on the CPU: glibc 2.36 with madvise huge pages.
  monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(host_memory, "_thp_setting", lambda: "always [madvise] never\n")
  restarts = []
  monkeypatch.setattr(host_memory.os, "execve", lambda *a: restarts.append(a))

  def run(environ, installed, devices=(device,)):
    monkeypatch.setattr(xla_cpu, "installed_accelerator_plugins", lambda: installed)
    monkeypatch.setattr(xla_cpu, "accelerator_device_files", lambda: list(devices))
    monkeypatch.setattr(host_memory.os, "environ", environ)
    restarts.clear()
    changed = xla_cpu.use_tuned_flags(environ)
    host_memory.reexec_with_hugepages(["python", "-m", "pixcon_jax.main"])
    return changed, bool(restarts)

  # JAX_PLATFORMS unset (the normal case on pods): the plugin's backend runs, nothing changes.
  for environ in ({}, {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, {"JAX_PLATFORMS": "tpu,cpu"}):
    before = dict(environ)
    assert run(environ, plugins) == (False, False), environ
    assert environ == before
  # The same host forced onto the CPU, and a host without plugins, are tuned.
  assert run({"JAX_PLATFORMS": "cpu"}, plugins) == (True, True)
  assert run({}, []) == (True, True)
  # The plugin installed without its hardware (the [aot] extra on a CPU host): JAX runs on the
  # CPU, so the run is tuned.
  assert run({}, plugins, devices=()) == (True, True)


SLURM_4 = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-4]", "SLURM_NTASKS": "4",
           "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ,installed,mode", [
    ({}, (), "single"),  # a workstation
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"}, (), "single"),  # salloc shell, no job step
    (SLURM_4, (), "auto"),
    (dict(SLURM_4, SLURM_NTASKS="1"), (), "single"),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
      "OMPI_COMM_WORLD_SIZE": "8"}, (), "auto"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, ("libtpu",), "auto"),  # GKE pod
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, ("libtpu",), "auto"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, ("libtpu",), "auto"),  # multislice
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, ("libtpu",), "single"),  # one-host GKE TPU
    ({}, ("libtpu",), "probe"),  # GCE TPU VM: only its metadata server knows
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, (), "single"),  # no TPU runtime here
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, ("kubernetes",),
     "auto"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, ("kubernetes",), "single"),  # a plain pod
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, (), "single"),
])
def test_multihost_start_uses_jax_auto_detection_where_a_cluster_is(environ, installed, mode,
                                                                   monkeypatch):
  from pixcon_jax import multihost  # pylint: disable=g-import-not-at-top
  for key in list(os.environ):
    if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JOB_")):
      monkeypatch.delenv(key)
  for key, value in environ.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(multihost, "_installed", lambda package: package in installed)
  calls = []

  def fake_initialize(**kwargs):
    calls.append(kwargs)
    if mode == "probe" and not kwargs:  # What JAX raises on a TPU-runtime host outside any TPU VM.
      raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(multihost.jax.distributed, "initialize", fake_initialize)
  line = multihost.initialize()
  assert calls == ([] if mode == "single" else [{}]), (calls, line)  # no arguments: JAX's own
  assert line.startswith("single process" if mode in ("single", "probe") else
                         "jax.distributed.initialize() auto-detected"), line
  # Explicit flags win over any environment.
  calls.clear()
  line = multihost.initialize(coordinator_address="10.0.0.9:1234", num_processes=2, process_id=1)
  assert calls == [dict(coordinator_address="10.0.0.9:1234", num_processes=2, process_id=1,
                        local_device_ids=None)], line
