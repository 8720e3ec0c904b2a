#!/usr/bin/env python3
"""check_deploy.py must fail on broken deployment files: copy the files it
reads into a temporary tree, break one thing at a time (a port, a probe, the
user, a script name, Envoy's discovery, ...) and expect a failure that names
it. Two fake servers whose --help shows other defaults show that the ports
are read from the server, not from a copy.

  test_check_deploy.py --root REPO --blockserve BUILD/blockserve --build-dir BUILD
"""

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

D, K, S = "Dockerfile", "deploy/k8s/deployment.yaml", "deploy/k8s/service.yaml"
E, C = "deploy/envoy/envoy.yaml", "deploy/docker-compose.yml"

# (file, text, replacement, what the failure message must contain)
MUTATIONS = [
    (D, "USER 10001:10001", "USER blockserve", "is not numeric"),
    (D, "USER 10001:10001", "USER 0", "USER is root"),
    (D, "EXPOSE 8000 8001 8002", "EXPOSE 8000 8080 8002", "lacks the gRPC port 8001"),
    (D, "EXPOSE 8000 8001 8002", "EXPOSE 8001 8002", "EXPOSE lacks the HTTP port 8000"),
    (D, '/blockserve-cli", "health"', '/blockserve-cli", "models"', "not blockserve-cli health"),
    (D, '"/usr/local/bin/blockserve-cli"', '"/usr/bin/blockserve-cli"', "where the install puts"),
    (D, '"127.0.0.1:8001"', '"127.0.0.1:9001"', "HEALTHCHECK asks 127.0.0.1:9001"),
    (D, "bash scripts/build.sh", "bash scripts/make.sh", "scripts/make.sh, which is not in the repository"),
    (D, "install-deps.sh build", "install-deps.sh devel", "has no mode 'devel'"),
    (D, "-DBS_BUILD_TESTS=OFF", "-DBS_BUILD_TEST=OFF", "-DBS_BUILD_TEST, which CMake does not know"),
    (D, 'CMD ["serve"]', 'CMD ["serve", "--port", "8001"]', "flag --port is not in serve --help"),
    (D, '["/usr/local/bin/blockserve"]', '["/usr/bin/blockserve"]', "is not the installed"),
    (".dockerignore", "tests/\n", "tests/\nscripts/\n", "excludes scripts/install-deps.sh"),
    (".dockerignore", "build*/\n", "", "does not exclude build/"),
    (C, '"8001:8001"', '"8001:9001"', "does not publish the gRPC port 8001"),
    (C, '"8000:8000"', '"8000:9000"', "does not publish the HTTP port 8000"),
    (C, "stop_grace_period: 45s", "stop_grace_period: 10s", "does not exceed --grace-seconds"),
    (C, '"--grpc-port", "8001"', '"--grpc-port", "8003"', "--grpc-port 8003 is not a published port"),
    ("deploy/prometheus.yml", "blockserve:8002", "blockserve:9090", "not blockserve:8002"),
    ("deploy/docker-compose.gpu.yml", "driver: nvidia", "driver: amd", "driver nvidia"),
    (K, "readinessProbe:\n            grpc: {port: 8001}", "readinessProbe:\n            grpc: {port: 8002}",
     "readinessProbe probes port 8002"),
    (K, "livenessProbe:\n            grpc: {port: 8001}",
     "livenessProbe:\n            tcpSocket: {port: 8001}", "livenessProbe is not a gRPC probe"),
    (K, "              memory: 24Gi\n              nvidia.com/gpu: 1\n          # Loading",
     "              memory: 24Gi\n          # Loading", "no nvidia.com/gpu limit"),
    (K, "runAsNonRoot: true", "runAsNonRoot: false", "runAsNonRoot is not set"),
    (K, "runAsUser: 10001", "runAsUser: 1000", "differs from the image's USER 10001"),
    (K, "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 30",
     "terminationGracePeriodSeconds 30 does not cover"),
    (K, "- $(BS_THREADS)", "- $(THREADS)", "$(THREADS), which env does not define"),
    (K, "mountPath: /models", "mountPath: /weights", "nothing is mounted at --model-repository /models"),
    (K, "containerPort: 8001", "containerPort: 8081", "no containerPort for the gRPC port 8001"),
    (K, "containerPort: 8000", "containerPort: 8080", "no containerPort for the HTTP port 8000"),
    (K, "- --log-format", "- --log-style", "argument --log-style is not in serve --help"),
    (K, "claimName: blockserve-models", "claimName: models", "claim models has no"),
    (K, 'cpu: "8"\n              memory: 24Gi\n              nvidia.com/gpu: 1\n            limits',
     'memory: 24Gi\n              nvidia.com/gpu: 1\n            limits', "needs CPU requests"),
    ("deploy/k8s/hpa.yaml", "kind: Deployment\n    name: blockserve",
     "kind: Deployment\n    name: blockserve-gpu", "is not the Deployment blockserve"),
    ("deploy/k8s/custom-metrics/hpa-pending-requests.yaml", "name: nv_inference_pending_request_count",
     "name: nv_inference_queue_count", "nv_inference_queue_count is not produced"),
    (S, "  clusterIP: None\n", "", "no headless Service"),
    (S, "targetPort: metrics", "targetPort: stats", "targets stats"),
    (E, "type: STRICT_DNS", "type: LOGICAL_DNS", "does not spread over every replica"),
    (E, "timeout: 0s\n", "timeout: 15s\n", "route timeout 15s would cut"),
    (E, "grpc_health_check: {}", "tcp_health_check: {}", "has no gRPC health check"),
    (E, "max_concurrent_streams: 256", "max_concurrent_streams: 1000", "exceeds the server's"),
    (E, "address: blockserve-headless.blockserve", "address: blockserve.blockserve",
     "is not a headless Service"),
    (E, "explicit_http_config:\n            http2_protocol_options:",
     "explicit_http_config:\n            http_protocol_options:", "does not speak HTTP/2"),
    (E, "{address: 0.0.0.0, port_value: 8001}", "{address: 0.0.0.0, port_value: 10000}",
     "no listener on the gRPC port"),
    ("deploy/kustomization.yaml", "  - k8s/hpa.yaml\n", "", "hpa.yaml is not among the resources"),
    ("deploy/kustomization.yaml", "envoy.yaml=envoy/envoy.yaml", "config.yaml=envoy/envoy.yaml",
     "is not deploy/envoy/envoy.yaml through"),
]

# Fake servers: the real --help with other defaults.
FAKE_HELP = [
    ("s/default 8001;/default 9001;/", "lacks the gRPC port 9001"),
    ("s/--grace-seconds N .*(default 30)/--grace-seconds N  drain time (default 60)/",
     "does not exceed --grace-seconds 60"),
    ("s/--max-concurrent-streams N .*(default 256)/--max-concurrent-streams N  (default 100)/",
     "exceeds the server's --max-concurrent-streams 100"),
    ("$a\\  --metrics-port N              Prometheus /metrics port (default 9102)",
     "EXPOSE lacks the metrics port 9102"),
]


def copy_tree(root, dst):
    os.makedirs(dst)
    for rel in ["Dockerfile", ".dockerignore", "CMakeLists.txt", "deploy", "scripts"]:
        src = os.path.join(root, rel)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, rel))
        else:
            shutil.copy2(src, os.path.join(dst, rel))


def run_check(tree, blockserve, build_dir):
    r = subprocess.run([sys.executable, os.path.join(HERE, "check_deploy.py"), "--root", tree,
                        "--blockserve", blockserve, "--build-dir", build_dir],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--blockserve", required=True)
    ap.add_argument("--build-dir", required=True)
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    blockserve = os.path.abspath(args.blockserve)
    work = tempfile.mkdtemp(prefix="bs_mut_")
    bad = []
    try:
        base = os.path.join(work, "base")
        copy_tree(root, base)
        rc, out = run_check(base, blockserve, args.build_dir)
        if rc != 0:
            print(out)
            print("FAIL: the unmodified copy does not pass")
            return 1
        cases = [(f, a, b, want, blockserve) for f, a, b, want in MUTATIONS]
        for i, (sed, want) in enumerate(FAKE_HELP):
            fake = os.path.join(work, "fake%d.sh" % i)
            with open(fake, "w") as f:
                f.write("#!/bin/sh\n\"%s\" \"$@\" 2>&1 | sed '%s'\n" % (blockserve, sed))
            os.chmod(fake, os.stat(fake).st_mode | stat.S_IXUSR)
            cases.append((None, None, None, want, fake))
        for n, (path, old, new, want, server) in enumerate(cases):
            tree = os.path.join(work, "m%d" % n)
            shutil.copytree(base, tree, symlinks=True)
            label = "%s: %r -> %r" % (path, old, new) if path else "server %s" % server
            if path:
                p = os.path.join(tree, path)
                with open(p) as f:
                    text = f.read()
                if text.count(old) != 1:
                    bad.append(label)
                    print("FAIL: %s: the text to break occurs %d times (update this test)"
                          % (label, text.count(old)))
                    continue
                with open(p, "w") as f:
                    f.write(text.replace(old, new))
            rc, out = run_check(tree, server, args.build_dir)
            fails = [x for x in out.splitlines() if x.startswith("FAIL:")]
            if rc != 0 and any(want in x for x in fails):
                print("ok:   %s\n        -> %s" % (label, [x for x in fails if want in x][0]))
            else:
                bad.append(label)
                print("FAIL: %s: expected a failure containing %r, got rc %d:\n%s"
                      % (label, want, rc, out))
            shutil.rmtree(tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("test_check_deploy: %d cases, %d not caught" % (len(MUTATIONS) + len(FAKE_HELP), len(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
