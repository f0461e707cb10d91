"""A run whose workdir is a gs:// bucket: checkpoints, TensorBoard events, resume, predict.

The bucket lives in gcp-storage-emulator (a subprocess on a free 127.0.0.1 port). Each client
of the run is pointed at it the way it allows:
  - tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL;
  - google-cloud-storage (orbax's bucket-layout query): STORAGE_EMULATOR_HOST;
  - TensorFlow's GCS file system (tf.io.gfile: etils.epath with TensorFlow installed, so
    orbax's and grain's metadata files, and TensorBoard's event writer) has its endpoint
    https://www.googleapis.com built in; it honours `https_proxy` and `CURL_CA_BUNDLE`, so
    the fixture runs a proxy that answers CONNECT, terminates TLS with a throw-away
    certificate for www.googleapis.com and forwards the plain HTTP to the emulator.
See docs/CLOUD_STORAGE.md.
"""
import contextlib
import json
import pathlib
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "pixcon-test"
GCS_HOST = "www.googleapis.com"

# Four departures of gcp-storage-emulator from the GCS JSON API that the run's clients meet,
# corrected in the emulator process before it starts:
#   - a zero-byte media upload (TF's directory marker 'dir/') has no body, which the
#     emulator reads as None and fails on;
#   - TF sends `Transfer-Encoding: chunked` together with `Content-Length`; the emulator
#     reads Content-Length raw bytes and stores the chunk framing (RFC 7230 3.3.3: the
#     transfer encoding wins);
#   - resumable-upload URLs are built as http://<Host>, but the proxy's clients came in by
#     https, and TF sends the upload there without a proxy for plain http;
#   - media downloads lack the `x-goog-generation` header, from which tensorstore takes the
#     object generation of a byte-range read (OCDBT manifests) and then fails on the next
#     conditional read ("Malformed StorageGeneration").
_EMULATOR = """
import sys
from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

_media_upload = objects._media_upload
def media_upload(request, response, storage):
  if request.data is None:
    request._data = b""
  return _media_upload(request, response, storage)
objects._media_upload = media_upload

_read_raw_data = server._read_raw_data
def read_raw_data(handler):
  if (handler.headers.get("Transfer-Encoding") or "").lower() == "chunked":
    del handler.headers["Content-Length"]
  return _read_raw_data(handler)
server._read_raw_data = read_raw_data

_request_init = server.Request.__init__
def request_init(self, handler, method):
  _request_init(self, handler, method)
  if self._base_url == "http://%s":
    self._base_url = "https://%s"
    self._full_url = self._base_url + self._path
server.Request.__init__ = request_init

_download = objects.download
def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
objects.download = download
for _, methods in server.HANDLERS:
  for method, handler in list(methods.items()):
    if handler is _download:
      methods[method] = download

sys.exit(main(sys.argv[1:]))
""" % (GCS_HOST, GCS_HOST)

TINY = [
    "--config.model.overrides.widths=(8,16,32,64)", "--config.model.overrides.stem_width=16",
    "--config.model.overrides.layer1_planes=8", "--config.model.proj_dim=16",
    "--config.data.crop_size=(64,64)", "--config.data.batch_size=4",
    "--config.data.synthetic_size=(64,96)", "--config.data.eval_pad_size=(64,96)",
    "--config.data.synthetic_num_train=32", "--config.data.synthetic_num_val=4",
    "--config.data.eval_batch_size=4", "--config.data.worker_count=0",
    "--config.log.every_steps=1", "--config.checkpoint.every_steps=2",
    "--config.eval.num_summary_images=0", "--config.memory.pixel_queue_size=64",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pipe(tls: ssl.SSLSocket, plain: socket.socket) -> None:
  """Copies bytes both ways until either side closes."""
  try:
    while True:
      # Bytes already decrypted inside the TLS object do not make its socket readable.
      ready = [tls] if tls.pending() else select.select([tls, plain], [], [], 120)[0]
      if not ready:
        return
      for src in ready:
        data = src.recv(1 << 16)
        if not data:
          return
        (plain if src is tls else tls).sendall(data)
  except OSError:
    return
  finally:
    for s in (tls, plain):
      with contextlib.suppress(OSError):
        s.close()


def _serve_proxy(listener: socket.socket, context: ssl.SSLContext, upstream: int) -> None:
  """CONNECT proxy: TLS ends here, the requests go on in plain HTTP to the emulator."""
  def handle(client):
    try:
      head = b""
      while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        if not chunk:
          client.close()
          return
        head += chunk
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      tls = context.wrap_socket(client, server_side=True)
    except OSError:
      client.close()
      return
    _pipe(tls, socket.create_connection(("127.0.0.1", upstream)))

  while True:
    try:
      client, _ = listener.accept()
    except OSError:  # closed by the fixture
      return
    threading.Thread(target=handle, args=(client,), daemon=True).start()


@pytest.fixture(scope="module")
def gcs():
  """A bucket in gcp-storage-emulator and the environment that sends every client there."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="pixcon_gcs_"))
  key, cert = root / "key.pem", root / "cert.pem"
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-subj", f"/CN={GCS_HOST}",
                  # TF uploads through www.googleapis.com and reads from storage.googleapis.com.
                  "-addext", f"subjectAltName=DNS:{GCS_HOST},DNS:storage.googleapis.com",
                  "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  emulator_log = open(root / "emulator.log", "w")
  emulator = subprocess.Popen(
      [sys.executable, "-c", _EMULATOR, "start", f"--port={port}", "--host=127.0.0.1",
       "--in-memory", f"--default-bucket={BUCKET}"], stdout=emulator_log, stderr=subprocess.STDOUT)
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert, key)
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(64)
  threading.Thread(target=_serve_proxy, args=(listener, context, port), daemon=True).start()
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=5).read()
        break
      except OSError:
        if emulator.poll() is not None or time.time() > deadline:
          raise RuntimeError("gcp-storage-emulator did not start: "
                             + (root / "emulator.log").read_text()[-2000:]) from None
        time.sleep(0.2)
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = helpers.subprocess_env(
        cache_dir=root / "jax_cache", https_proxy=proxy, HTTPS_PROXY=proxy,
        no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost", CURL_CA_BUNDLE=str(cert),
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", TENSORSTORE_GCS_HTTP_URL=url,
        STORAGE_EMULATOR_HOST=url, GCS_RETRY_CONFIG_MAX_RETRIES="2")
    yield dict(url=url, env=env, root=root)
  finally:
    listener.close()
    emulator.terminate()
    try:
      emulator.wait(timeout=10)
    except subprocess.TimeoutExpired:
      emulator.kill()
    emulator_log.close()
    shutil.rmtree(root, ignore_errors=True)


def _objects(gcs, prefix: str) -> dict[str, int]:
  """{object name: size} under `prefix` in the bucket, from the emulator's JSON API."""
  query = urllib.parse.urlencode({"prefix": prefix, "maxResults": 100000})
  with urllib.request.urlopen(f"{gcs['url']}/storage/v1/b/{BUCKET}/o?{query}") as r:
    items = json.load(r).get("items", [])
  return {o["name"]: int(o["size"]) for o in items}


def _upload(gcs, name: str, data: bytes) -> None:
  query = urllib.parse.urlencode({"uploadType": "media", "name": name})
  req = urllib.request.Request(f"{gcs['url']}/upload/storage/v1/b/{BUCKET}/o?{query}",
                               data=data, method="POST",
                               headers={"Content-Type": "application/octet-stream"})
  urllib.request.urlopen(req).read()


def _main(gcs, log_name: str, *args: str, config: str = "configs/demo.py:runlocal"
          ) -> tuple[int, str, str]:
  proc = subprocess.run(
      [sys.executable, "-m", "pixcon_jax.main", f"--config={config}", *TINY, *args], cwd=REPO,
      env=gcs["env"], capture_output=True, text=True, timeout=600)
  (gcs["root"] / f"{log_name}.log").write_text(proc.stderr)
  return proc.returncode, proc.stdout, proc.stderr


def _steps(objects: dict[str, int], run: str) -> list[int]:
  """Finalised checkpoint steps: orbax marks a finished GCS checkpoint with commit_success."""
  prefix = f"{run}/checkpoints/"
  return sorted({int(n[len(prefix):].split("/")[0]) for n in objects
                 if n.startswith(prefix) and n.endswith("/commit_success.txt")})


def _png(height: int, width: int) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def runs(gcs):
  """Train 2 steps in the bucket, resume to 3, evaluate, predict with init_from there."""
  workdir = f"gs://{BUCKET}/run"
  out = {"workdir": workdir}
  t0 = time.time()
  out["first"] = _main(gcs, "first", f"--workdir={workdir}", "--config.schedule.total_steps=2")
  out["after_first"] = _objects(gcs, "run/")
  t1 = time.time()
  out["resume"] = _main(gcs, "resume", f"--workdir={workdir}", "--config.schedule.total_steps=3")
  out["after_resume"] = _objects(gcs, "run/")
  t2 = time.time()
  out["eval"] = _main(gcs, "eval", f"--workdir={workdir}", "--config.mode=eval")
  out["after_eval"] = _objects(gcs, "run/")
  t3 = time.time()
  _upload(gcs, "images/street.png", _png(40, 56))
  _upload(gcs, "images/notes.txt", b"not an image")
  out["predict"] = _main(
      gcs, "predict", f"--workdir=gs://{BUCKET}/fresh", "--config.mode=predict",
      f"--config.init_from={workdir}/checkpoints/3/state",
      f"--config.predict.input_dir=gs://{BUCKET}/images",
      f"--config.predict.output_dir=gs://{BUCKET}/pred")
  out["pred"] = _objects(gcs, "pred/")
  print(f"first run {t1 - t0:.0f}s, resumed run {t2 - t1:.0f}s, eval {t3 - t2:.0f}s, "
        f"predict {time.time() - t3:.0f}s")
  return out


def test_training_writes_checkpoints_and_tensorboard_events_into_the_bucket(runs):
  rc, out, err = runs["first"]
  assert rc == 0, err[-5000:]
  assert "final mIoU: " in out
  first = runs["after_first"]
  assert _steps(first, "run") == [2], sorted(first)
  assert any(n.startswith("run/checkpoints/2/state/") for n in first), sorted(first)
  assert "run/checkpoints/2/data/process_0-of-1.json" in first, sorted(first)
  events = [n for n in first if n.startswith("run/events.out.tfevents.")]
  assert events and all(first[n] > 0 for n in events), sorted(first)


def test_a_second_run_resumes_from_the_bucket(runs):
  rc, out, err = runs["resume"]
  assert rc == 0, err[-5000:]
  assert f"resumed from the checkpoint of step 2 in {runs['workdir']}" in err
  assert "final mIoU: " in out
  after = runs["after_resume"]
  assert _steps(after, "run") == [2, 3], sorted(after)
  events = [n for n in after if n.startswith("run/events.out.tfevents.")]
  assert len(events) == 2 and all(after[n] > 0 for n in events), sorted(after)


def test_eval_mode_reads_the_bucket_checkpoint_and_writes_its_json_there(runs):
  rc, out, err = runs["eval"]
  assert rc == 0, err[-5000:]
  assert "eval validation: mIoU" in out, out
  names = set(runs["after_eval"])
  assert "run/eval_validation.json" in names, sorted(names)
  assert "run/eval_validation.json.tmp" not in names


def test_predict_reads_init_from_and_images_in_the_bucket_and_writes_pngs_there(runs):
  rc, out, err = runs["predict"]
  assert rc == 0, err[-5000:]
  assert f"init_from gs://{BUCKET}/run/checkpoints/3/state" in err
  assert set(runs["pred"]) == {"pred/label/street.png", "pred/color/street.png",
                               "pred/predict_report.json"} | {
                                   n for n in runs["pred"] if n.endswith("/")}, runs["pred"]
  assert "skipped 1" in out, out
