#!/usr/bin/env python3
"""Run the Dockerfile's build path without Docker, then serve from what it installed.

With --context-build 1 (the Release run): copy the build context as docker
build would send it (the repository less .dockerignore), run the build
stage's RUN steps from the Dockerfile itself in it (/src and /stage mapped to
temporary directories; WITH_CUDA=0 since NVIDIA's repository is out of reach
here -- a CUDA toolkit already installed is still found), and check:
  - the installed layout: PREFIX/bin/blockserve, bin/blockserve-cli and
    lib/blockserve/libbs_cuda.so when those targets exist, nothing stray;
  - runtime-packages.txt names installed Debian packages, and the runtime
    stage's `install-deps.sh runtime` accepts them.
With --context-build 0 (the sanitizer run): `cmake --install` the current
build into a temporary prefix and check the same layout.

Then start the installed server as the image's ENTRYPOINT + CMD would (on a
free port, loopback only; LD_LIBRARY_PATH as the image sets it) with the
built-in models, and check grpc.health.v1 answers SERVING, the image's
HEALTHCHECK command succeeds against it (when blockserve-cli exists) and fails
against a closed port, /metrics serves the metrics the deployment files use
(when --metrics-port exists), and SIGTERM stops it with exit code 0.
"""

import argparse
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import deploylib as dl  # noqa: E402

failures = []


def check(cond, msg):
    print(("ok:   " if cond else "FAIL: ") + msg, flush=True)
    if not cond:
        failures.append(msg)
    return cond


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def context_build(root, df, work):
    """Run the build stage's RUN steps; return the staging directory (DESTDIR)."""
    ctx = os.path.join(work, "src")
    stage = os.path.join(work, "stage")
    ign = dl.DockerIgnore(os.path.join(root, ".dockerignore"))
    files = dl.context_files(root, ign)
    check(not any(f.startswith(("build/", "build-asan/")) for f in files),
          "the build context leaves out host build trees (%d files)" % len(files))
    for f in files:
        dst = os.path.join(ctx, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(root, f), dst, follow_symlinks=False)
    build = df.stage_index("build")
    env = dict(os.environ)
    env.update(df.arg_defaults(build))
    env["WITH_CUDA"] = "0"
    for x in df.of_stage(build, "ENV"):
        for k, v in re.findall(r"(\w+)=(\S+)", x.rest):
            env[k] = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), v)

    def mapped(text):
        text = re.sub(r"(?<![\w/])/src(?=[/\s]|$)", ctx, text)
        return re.sub(r"(?<![\w/])/stage(?=[/\s]|$)", stage, text)

    for x in df.of_stage(build, "RUN"):
        cmd = mapped(x.rest)
        print("RUN (Dockerfile line %d): %s" % (x.line, cmd), flush=True)
        rc = subprocess.run(["bash", "-ec", cmd], cwd=ctx, env=env).returncode
        if not check(rc == 0, "Dockerfile line %d succeeds" % x.line):
            return None
    return stage


def check_layout(prefix, expect_cli, expect_cuda):
    files = set()
    for d, _, fs in os.walk(prefix):
        files |= {os.path.relpath(os.path.join(d, f), prefix) for f in fs}
    expected = {"bin/blockserve"}
    if expect_cli:
        expected.add("bin/blockserve-cli")
    if expect_cuda:
        expected.add("lib/blockserve/libbs_cuda.so")
    check(expected <= files, "installed %s (have %s)" % (sorted(expected), sorted(files)))
    stray = {f for f in files - expected if not f.startswith("share/")}
    check(not stray, "nothing else installed outside share/ (%s)" % sorted(stray))
    for f in expected & files:
        if f.startswith("bin/"):
            check(os.access(os.path.join(prefix, f), os.X_OK), "%s is executable" % f)


def check_runtime_packages(root, stage):
    path = os.path.join(stage, "runtime-packages.txt")
    if not check(os.path.isfile(path), "the build stage wrote runtime-packages.txt"):
        return
    with open(path) as f:
        pkgs = f.read().split()
    check(len(pkgs) >= 3, "runtime packages: %s" % pkgs)
    for p in pkgs:
        st = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        check("install ok installed" in st.stdout, "runtime package %s is a Debian package here" % p)
    rc = subprocess.run(["bash", os.path.join(root, "scripts", "install-deps.sh"), "runtime"] + pkgs)
    check(rc.returncode == 0, "install-deps.sh runtime accepts them")


def health(address):
    """grpc.health.v1 Check("") status name, or the error."""
    import grpc
    import health_pb2
    import health_pb2_grpc
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=10)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return str(e.code())


def serve_and_probe(root, df, usr_local, expect_cli):
    """Start the installed server the way the image does and probe it."""
    final = len(df.stages) - 1
    entry = df.last(final, "ENTRYPOINT").exec_form()
    cmd = df.last(final, "CMD").exec_form() or []

    def host(p):  # an image path under /usr/local -> the installed tree here
        return os.path.join(usr_local, os.path.relpath(p, "/usr/local")) \
            if p.startswith("/usr/local/") else p
    env = dict(os.environ)
    for x in df.of_stage(final, "ENV"):
        for k, v in re.findall(r"(\w+)=(\S+)", x.rest):
            env[k] = ":".join(host(p) for p in v.split(":"))
    flags = dl.serve_help(host(entry[0]))
    argv = [host(entry[0])] + entry[1:] + cmd + ["--grpc-port", "0", "--grpc-address", "127.0.0.1"]
    mport = None
    if "--metrics-port" in flags:
        mport = free_port()
        argv += ["--metrics-port", str(mport)]
    log = tempfile.TemporaryFile(mode="w+")
    print("starting:", " ".join(argv), flush=True)
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)

    def text():
        log.seek(0)
        return log.read()
    port = None
    deadline = time.time() + 300
    while port is None and time.time() < deadline and proc.poll() is None:
        m = re.search(r"serving (\d+) models on [0-9.]+:(\d+)", text())
        if m:
            port = int(m.group(2))
            check(int(m.group(1)) >= 1, "the image's default command serves the built-in models (%s)"
                  % m.group(1))
        else:
            time.sleep(0.1)
    if not check(port is not None, "the installed server starts"):
        proc.kill()
        print(text())
        return
    address = "127.0.0.1:%d" % port
    check(health(address) == "SERVING", "grpc.health.v1 Check answers SERVING on %s" % address)

    hc = df.last(final, "HEALTHCHECK").exec_form()
    if expect_cli:
        def run_hc(addr):
            a = [host(hc[0])] + hc[1:]
            i = a.index("-u") if "-u" in a else None
            a = a[:i] + ["-u", addr] + a[i + 2:] if i is not None else a + ["-u", addr]
            return subprocess.run(a, capture_output=True, text=True, timeout=60, env=env)
        r = run_hc(address)
        check(r.returncode == 0, "HEALTHCHECK %s exits 0 against the server (%s)"
              % (hc, (r.stdout + r.stderr).strip()))
        r = run_hc("127.0.0.1:%d" % free_port())
        check(r.returncode != 0, "HEALTHCHECK fails against a closed port")
    else:
        check(False, "blockserve-cli is built, so the HEALTHCHECK command can run")

    if mport is not None:
        try:
            body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=10).read()
            body = body.decode()
            check(True, "/metrics answers on the metrics port")
            with open(os.path.join(root, "deploy", "k8s", "custom-metrics",
                                   "hpa-pending-requests.yaml")) as f:
                used = set(re.findall(r"name: (nv_[a-z_]+)", f.read()))
            for name in sorted(used):
                check(re.search(r"^%s[{ ]" % name, body, re.M) is not None,
                      "/metrics serves %s, which the custom-metrics HPA scales on" % name)
        except OSError as e:
            check(False, "/metrics on port %d: %s" % (mport, e))
    else:
        check(False, "serve --help lists --metrics-port (the image exposes 8002)")

    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = None
    if not check(rc == 0, "SIGTERM stops the server with exit code 0 (got %s)" % rc):
        print(text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--context-build", type=int, default=1)
    ap.add_argument("--expect-cli", type=int, default=0)
    ap.add_argument("--expect-cuda", type=int, default=0)
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    # A target under another name than the install rules know would be built
    # but not installed: what the build produced is expected in the image.
    for name, attr in [("blockserve-cli", "expect_cli"), ("libbs_cuda.so", "expect_cuda")]:
        built = [p for p in glob.glob(os.path.join(args.build_dir, "**", name), recursive=True)
                 if "/CMakeFiles/" not in p and "_deps" not in p]
        if built and not getattr(args, attr):
            print("note: %s was built (%s): expecting it installed" % (name, built[0]))
            setattr(args, attr, 1)
    df = dl.Dockerfile(os.path.join(root, "Dockerfile"))
    work = tempfile.mkdtemp(prefix="bs_deploy_")
    try:
        from harness import generate_stubs
        generate_stubs(os.path.join(work, "stubs"))
        if args.context_build:
            stage = context_build(root, df, work)
            if stage is None:
                return 1
            # The runtime stage copies DESTDIR/usr/local to /usr/local.
            usr_local = os.path.join(stage, "usr", "local")
            check_runtime_packages(root, stage)
        else:
            print("SKIP: context build (sanitizer build; the Release run does it): "
                  "cmake --install of this build instead")
            usr_local = os.path.join(work, "prefix")
            rc = subprocess.run(["cmake", "--install", args.build_dir, "--prefix", usr_local]).returncode
            if not check(rc == 0, "cmake --install succeeds"):
                return 1
        check_layout(usr_local, args.expect_cli, args.expect_cuda)
        serve_and_probe(root, df, usr_local, args.expect_cli)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("test_install: %d failures" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
