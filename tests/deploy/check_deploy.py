#!/usr/bin/env python3
"""Check the deployment files against each other and against the server.

Parses every YAML under deploy/ (Kubernetes manifests, docker-compose,
Prometheus, Envoy, kustomization) and the Dockerfile, and checks what would
break a deployment: ports that disagree with the server's defaults (read from
`blockserve serve --help`), probes off the gRPC port, a missing GPU limit, an
HPA aimed at another Deployment, flags the server does not have, scripts that
do not exist, a root user, Envoy not speaking HTTP/2 upstream, and so on.

  check_deploy.py --root REPO --blockserve BUILD/blockserve [--build-dir BUILD]
Exit 0 when every check passes; each failure is printed with its file.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402


class Checks:
    def __init__(self):
        self.failures = []
        self.notes = []
        self.passed = 0

    def check(self, cond, where, msg):
        if cond:
            self.passed += 1
        else:
            self.failures.append("%s: %s" % (where, msg))
        return cond

    def note(self, msg):
        self.notes.append(msg)


def k8s_docs(root):
    """{relative path: [documents]} for deploy/k8s/**/*.yaml."""
    out = {}
    for p in sorted(glob.glob(os.path.join(root, "deploy", "k8s", "**", "*.yaml"), recursive=True)):
        out[os.path.relpath(p, root)] = dl.load_docs(p)
    return out


def find(docs, kind, name=None):
    """[(path, doc)] of a kind (and name) across the manifests."""
    return [(p, d) for p, ds in docs.items() for d in ds
            if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def sleep_seconds(container):
    cmd = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")
    if cmd and cmd[0] == "sleep":
        return int(cmd[1])
    s = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep")
    return int(s["seconds"]) if s else 0


class Context:
    """What the checks share: the server's flags, the Dockerfile, the ports."""

    def __init__(self, args, c):
        self.root = args.root
        self.flags = dl.serve_help(args.blockserve)
        self.grpc_port = int(self.flags["--grpc-port"])
        self.http_port = int(self.flags.get("--http-port") or 0)  # 0: no HTTP front end
        self.grace = int(self.flags["--grace-seconds"])
        self.max_streams = int(self.flags["--max-concurrent-streams"])
        self.df = dl.Dockerfile(os.path.join(self.root, "Dockerfile"))
        self.final = len(self.df.stages) - 1
        expose = set()
        for x in self.df.of_stage(self.final, "EXPOSE"):
            expose |= {int(p.split("/")[0]) for p in x.rest.split()}
        self.expose = expose
        if "--metrics-port" in self.flags and self.flags["--metrics-port"]:
            self.metrics_port = int(self.flags["--metrics-port"])
        else:
            # Not in --help yet: the files must still agree with each other, on
            # the one port the Dockerfile exposes besides gRPC.
            others = sorted(expose - {self.grpc_port})
            c.note("--metrics-port is not in `blockserve serve --help`: metrics port taken from "
                   "the Dockerfile's EXPOSE (%s) and checked for agreement only" % others)
            c.check(len(others) == 1, "Dockerfile",
                    "EXPOSE should list the gRPC port and one metrics port, has %s" % sorted(expose))
            self.metrics_port = others[0] if others else None


# ------------------------------------------------------------------ Dockerfile

def script_modes(path):
    """The modes a script's `case "$mode" in` accepts."""
    with open(path) as f:
        text = f.read()
    m = re.search(r'case "\$mode" in(.*?)\besac\b', text, re.S)
    if not m:
        return set()
    modes = set()
    for label in re.findall(r"^\s*([a-z][a-z |-]*)\)", m.group(1), re.M):
        modes |= {x.strip() for x in label.split("|")}
    return modes


def check_dockerfile(ctx, c, build_dir):
    df, where = ctx.df, "Dockerfile"
    c.check(len(df.stages) >= 2, where, "multi-stage: expected a build and a runtime stage")
    final = ctx.final
    copies = df.of_stage(final, "COPY")
    from_stages = {x.options().get("from") for x in copies} - {None}
    for s in from_stages:
        idx = df.stage_index(s)
        c.check(idx is not None and idx != final, where, "COPY --from=%s names no earlier stage" % s)

    # Non-root, numeric user (Kubernetes' runAsNonRoot cannot check a name).
    user = df.last(final, "USER")
    uid = None
    if c.check(user is not None, where, "the runtime stage sets no USER (runs as root)"):
        name = user.rest.split(":")[0]
        if c.check(name.isdigit(), where, "USER %s is not numeric: runAsNonRoot cannot verify it"
                   % user.rest):
            uid = int(name)
            c.check(uid != 0, where, "USER is root")
    ctx.uid = uid

    # Ports.
    c.check(ctx.grpc_port in ctx.expose, where, "EXPOSE %s lacks the gRPC port %d (--help)"
            % (sorted(ctx.expose), ctx.grpc_port))
    if ctx.metrics_port is not None:
        c.check(ctx.metrics_port in ctx.expose, where, "EXPOSE lacks the metrics port %d"
                % ctx.metrics_port)
    if ctx.http_port:
        c.check(ctx.http_port in ctx.expose, where, "EXPOSE lacks the HTTP port %d" % ctx.http_port)

    # Install prefix: cmake --install --prefix P in the build stage; the runtime
    # stage copies DESTDIR/P to P; entry point and health check live in P/bin.
    build_runs = [x for x in df.instructions if x.keyword == "RUN" and x.stage != final]
    prefix = None
    for x in build_runs:
        m = re.search(r"cmake --install\s+\S+.*?--prefix[ =](\S+)", x.rest)
        if m:
            prefix = m.group(1)
    if c.check(prefix is not None, where, "no `cmake --install ... --prefix P` in the build stage"):
        ctx.prefix = prefix
        c.check(any(x.words() and x.words()[-1].rstrip("/") == prefix.rstrip("/") and
                    x.options().get("from") for x in copies), where,
                "the runtime stage does not COPY the installed tree to %s" % prefix)
    entry = df.last(final, "ENTRYPOINT")
    entry_argv = entry.exec_form() if entry else None
    c.check(entry_argv is not None, where, "ENTRYPOINT should be exec form")
    if entry_argv and prefix:
        c.check(entry_argv[0] == prefix + "/bin/blockserve", where,
                "ENTRYPOINT %s is not the installed %s/bin/blockserve" % (entry_argv[0], prefix))
    cmd = df.last(final, "CMD")
    cmd_argv = cmd.exec_form() if cmd else []
    argv = (entry_argv or [])[1:] + (cmd_argv or [])
    if argv and not argv[0].startswith("-"):
        c.check(argv[0] == "serve", where, "the image's command is `%s`, not the server" % argv[0])
        argv = argv[1:]
    for f in dl.flags_in(argv):
        c.check(f in ctx.flags, where, "ENTRYPOINT/CMD flag %s is not in serve --help" % f)

    hc = df.last(final, "HEALTHCHECK")
    if c.check(hc is not None, where, "no HEALTHCHECK"):
        hc_argv = hc.exec_form()
        if c.check(hc_argv is not None and len(hc_argv) >= 2, where,
                   "HEALTHCHECK CMD should be exec form: [blockserve-cli, health, ...]"):
            c.check(os.path.basename(hc_argv[0]) == "blockserve-cli" and hc_argv[1] == "health",
                    where, "HEALTHCHECK runs %s, not blockserve-cli health" % hc_argv[:2])
            if prefix:
                c.check(hc_argv[0] == prefix + "/bin/blockserve-cli", where,
                        "HEALTHCHECK's %s is not where the install puts blockserve-cli (%s/bin)"
                        % (hc_argv[0], prefix))
            url = dl.flag_value(hc_argv, "-u") or dl.flag_value(hc_argv, "--url")
            if url:
                c.check(int(url.rsplit(":", 1)[1]) == ctx.grpc_port, where,
                        "HEALTHCHECK asks %s, the server listens on %d" % (url, ctx.grpc_port))

    # RUN steps: scripts that exist, modes they accept, CMake options that exist.
    cache = {}
    if build_dir and os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            for line in f:
                m = re.match(r"([A-Za-z_0-9]+):", line)
                if m:
                    cache[m.group(1)] = True
    runs = [x for x in df.instructions if x.keyword == "RUN"]
    n_scripts = 0
    for x in runs:
        for m in re.finditer(r"(?:^|[\s/])(scripts/[A-Za-z0-9_.-]+)(?:\s+([a-z]+))?", x.rest):
            n_scripts += 1
            path = os.path.join(ctx.root, m.group(1))
            if not c.check(os.path.isfile(path), where,
                           "line %d runs %s, which is not in the repository" % (x.line, m.group(1))):
                continue
            modes = script_modes(path)
            if modes and m.group(2):
                c.check(m.group(2) in modes, where, "line %d: %s has no mode %r (has %s)"
                        % (x.line, m.group(1), m.group(2), sorted(modes)))
            if m.group(1) == "scripts/build.sh" and cache:
                for opt in re.findall(r"-D([A-Za-z_0-9]+)=", x.rest):
                    c.check(opt in cache, where, "line %d passes -D%s, which CMake does not know"
                            % (x.line, opt))
    c.check(n_scripts > 0, where, "no RUN step calls the repository's scripts")
    c.check(any("scripts/build.sh" in x.rest for x in runs), where,
            "the image is not built with scripts/build.sh (the README's and CI's build)")
    for x in df.instructions:
        if x.keyword == "COPY" and not x.options().get("from"):
            for src in x.words()[:-1]:
                if src != ".":
                    c.check(os.path.exists(os.path.join(ctx.root, src)), where,
                            "line %d copies %s, which does not exist" % (x.line, src))


def check_dockerignore(ctx, c):
    where = ".dockerignore"
    ign = dl.DockerIgnore(os.path.join(ctx.root, ".dockerignore"))
    c.check(ign.rules, where, "missing or empty")
    for needed in ["CMakeLists.txt", "scripts/build.sh", "scripts/install-deps.sh", "Dockerfile"]:
        c.check(not ign.excluded(needed), where, "excludes %s, which the image build needs" % needed)
    for x in ctx.df.instructions:
        if x.keyword == "COPY" and not x.options().get("from"):
            for src in x.words()[:-1]:
                if src != ".":
                    c.check(not ign.excluded(src), where, "excludes %s, which the Dockerfile COPYs" % src)
    # A host build tree in the context would bring a CMakeCache.txt of another path.
    for d in ["build", "build-asan", ".git"]:
        c.check(ign.excluded(d + "/CMakeCache.txt"), where, "does not exclude %s/" % d)


# --------------------------------------------------------------------- compose

def check_compose(ctx, c):
    path = os.path.join(ctx.root, "deploy", "docker-compose.yml")
    where = "deploy/docker-compose.yml"
    compose = dl.load_docs(path)[0]
    services = compose.get("services", {})
    server = [n for n, s in services.items() if isinstance(s.get("build"), dict)]
    if not c.check(len(server) == 1, where, "expected one service built from the Dockerfile"):
        return
    name = server[0]
    svc = services[name]
    build = svc["build"]
    context = os.path.normpath(os.path.join(os.path.dirname(path), build.get("context", ".")))
    c.check(context == os.path.normpath(ctx.root), where, "build context %s is not the repository"
            % build.get("context"))
    c.check(os.path.isfile(os.path.join(context, build.get("dockerfile", "Dockerfile"))), where,
            "build.dockerfile does not exist")
    ports = {dl.port_of(p) for p in svc.get("ports", [])}
    c.check(ctx.grpc_port in ports, where, "%s does not publish the gRPC port %d" % (name, ctx.grpc_port))
    if ctx.metrics_port:
        c.check(ctx.metrics_port in ports, where, "%s does not publish the metrics port %d"
                % (name, ctx.metrics_port))
    if ctx.http_port:
        c.check(ctx.http_port in ports, where, "%s does not publish the HTTP port %d"
                % (name, ctx.http_port))
    for p in ports:
        c.check(p in ctx.expose, where, "publishes container port %d, which the image does not EXPOSE" % p)

    def command_ok(svc_def, label):
        argv = svc_def.get("command") or []
        if isinstance(argv, str):
            argv = argv.split()
        for f in dl.flags_in(argv):
            c.check(f in ctx.flags, label, "command flag %s is not in serve --help" % f)
        port = dl.flag_value(argv, "--grpc-port")
        if port is not None:
            c.check(int(port) in ports, label, "--grpc-port %s is not a published port" % port)
    command_ok(svc, where)
    grace = svc.get("stop_grace_period")
    if c.check(grace is not None, where, "no stop_grace_period (Docker's 10 s cuts the drain short)"):
        c.check(int(str(grace).rstrip("s")) > ctx.grace, where,
                "stop_grace_period %s does not exceed --grace-seconds %d" % (grace, ctx.grace))

    # Prometheus scrapes the server's metrics port with the file that exists.
    prom = [s for s in services.values() if "prometheus" in str(s.get("image", ""))]
    if c.check(len(prom) == 1, where, "expected one Prometheus service"):
        conf = [v for v in prom[0].get("volumes", []) if "prometheus.yml" in str(v)]
        if c.check(conf, where, "Prometheus does not mount prometheus.yml"):
            host, target = str(conf[0]).split(":")[:2]
            host_path = os.path.normpath(os.path.join(os.path.dirname(path), host))
            c.check(os.path.isfile(host_path), where, "mounts %s, which does not exist" % host)
            flag = [a for a in prom[0].get("command", []) if a.startswith("--config.file=")]
            if flag:
                c.check(flag[0].split("=", 1)[1] == target, where,
                        "Prometheus reads %s but the file is mounted at %s" % (flag[0], target))
            pconf = dl.load_docs(host_path)[0]
            jobs = pconf.get("scrape_configs", [])
            targets = [t for j in jobs for sc in j.get("static_configs", []) for t in sc["targets"]]
            c.check("%s:%s" % (name, ctx.metrics_port) in targets, "deploy/prometheus.yml",
                    "scrapes %s, not %s:%s" % (targets, name, ctx.metrics_port))
            for j in jobs:
                c.check(j.get("metrics_path", "/metrics") == "/metrics", "deploy/prometheus.yml",
                        "metrics_path %s is not /metrics" % j.get("metrics_path"))

    gpu_path = os.path.join(ctx.root, "deploy", "docker-compose.gpu.yml")
    if os.path.exists(gpu_path):
        gw = "deploy/docker-compose.gpu.yml"
        gpu = dl.load_docs(gpu_path)[0]
        for n, s in gpu.get("services", {}).items():
            c.check(n in services, gw, "overrides service %s, which the base file lacks" % n)
            command_ok(s, gw)
            devs = s["deploy"]["resources"]["reservations"]["devices"]
            c.check(any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
                        for d in devs), gw, "the GPU reservation needs driver nvidia and capabilities [gpu]")


# ------------------------------------------------------------------ Kubernetes

def check_k8s(ctx, c, docs):
    for p, ds in docs.items():
        if p.endswith("-values.yaml"):
            continue  # Helm values (prometheus-adapter), not a manifest
        for d in ds:
            c.check(d.get("apiVersion") and d.get("kind") and (d.get("metadata") or {}).get("name"),
                    p, "a document lacks apiVersion, kind or metadata.name")
    servers = [(p, d) for p, d in find(docs, "Deployment")
               if any(x.get("image", "").split(":")[0].endswith("blockserve")
                      for x in d["spec"]["template"]["spec"]["containers"])]
    if not c.check(len(servers) == 1, "deploy/k8s", "expected one Deployment running the blockserve image"):
        return
    path, dep = servers[0]
    ctx.k8s_deployment = dep
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    c.check(all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items()), path,
            "the selector does not match the pod template's labels")
    container = [x for x in pod["containers"] if x["image"].split(":")[0].endswith("blockserve")][0]
    args = [str(a) for a in container.get("command", [])[1:] + container.get("args", [])]
    if args and not args[0].startswith("-"):
        c.check(args[0] == "serve", path, "the container runs `%s`, not the server" % args[0])
        args = args[1:]
    for f in dl.flags_in(args):
        c.check(f in ctx.flags, path, "argument %s is not in serve --help" % f)
    env = {e["name"] for e in container.get("env", [])}
    for a in args:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            c.check(var in env, path, "argument %s refers to $(%s), which env does not define" % (a, var))
    port = int(dl.flag_value(args, "--grpc-port") or ctx.grpc_port)
    c.check(port == ctx.grpc_port, path, "--grpc-port %d differs from the default %d that the image "
            "EXPOSEs and HEALTHCHECKs" % (port, ctx.grpc_port))

    cports = {p.get("name"): int(p["containerPort"]) for p in container.get("ports", [])}
    c.check(port in cports.values(), path, "no containerPort for the gRPC port %d" % port)
    if ctx.metrics_port:
        c.check(ctx.metrics_port in cports.values(), path,
                "no containerPort for the metrics port %d" % ctx.metrics_port)
    if ctx.http_port:
        c.check(ctx.http_port in cports.values(), path,
                "no containerPort for the HTTP port %d" % ctx.http_port)
    for n, p in cports.items():
        c.check(p in ctx.expose, path, "containerPort %s=%d is not EXPOSEd by the image" % (n, p))
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in ann:
        c.check(int(ann["prometheus.io/port"]) == ctx.metrics_port, path,
                "prometheus.io/port %s is not the metrics port" % ann["prometheus.io/port"])

    for probe in ["readinessProbe", "livenessProbe", "startupProbe"]:
        pr = container.get(probe)
        if probe == "startupProbe" and pr is None:
            continue
        if c.check(pr is not None, path, "no %s" % probe):
            g = pr.get("grpc")
            if c.check(g is not None, path, "%s is not a gRPC probe" % probe):
                c.check(int(g["port"]) == port, path, "%s probes port %s, the server serves gRPC on %d"
                        % (probe, g["port"], port))

    res = container.get("resources", {})
    lim, req = res.get("limits", {}), res.get("requests", {})
    c.check(int(lim.get("nvidia.com/gpu", 0)) >= 1, path, "no nvidia.com/gpu limit")
    if "nvidia.com/gpu" in req:
        c.check(str(req["nvidia.com/gpu"]) == str(lim.get("nvidia.com/gpu")), path,
                "nvidia.com/gpu requests and limits differ (Kubernetes rejects that)")
    c.check("memory" in lim, path, "no memory limit")

    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    c.check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, path, "runAsNonRoot is not set")
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    if uid is not None:
        c.check(int(uid) != 0, path, "runAsUser is 0")
        if getattr(ctx, "uid", None) is not None:
            c.check(int(uid) == ctx.uid, path, "runAsUser %s differs from the image's USER %d"
                    % (uid, ctx.uid))
    c.check(csc.get("allowPrivilegeEscalation") is False, path, "allowPrivilegeEscalation is not false")

    # The model repository is mounted where --model-repository points.
    repo = dl.flag_value(args, "--model-repository")
    if c.check(repo is not None, path, "no --model-repository: the pods would serve generated weights"):
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
        vol_name = mounts.get(repo.rstrip("/"))
        if c.check(vol_name, path, "nothing is mounted at --model-repository %s" % repo):
            vol = [v for v in pod.get("volumes", []) if v["name"] == vol_name]
            if c.check(vol, path, "volume %s is not defined" % vol_name):
                claim = (vol[0].get("persistentVolumeClaim") or {}).get("claimName")
                if claim:
                    c.check(find(docs, "PersistentVolumeClaim", claim), path,
                            "claim %s has no PersistentVolumeClaim manifest" % claim)

    # Shutdown: Kubernetes waits long enough for the preStop pause and the drain.
    grace = int(dl.flag_value(args, "--grace-seconds") or ctx.grace)
    tgp = int(pod.get("terminationGracePeriodSeconds", 30))
    c.check(tgp > grace + sleep_seconds(container), path,
            "terminationGracePeriodSeconds %d does not cover the preStop pause (%d s) and "
            "--grace-seconds %d" % (tgp, sleep_seconds(container), grace))

    check_services(ctx, c, docs, labels, cports, port)
    check_hpas(c, docs, dep, container)


def check_services(ctx, c, docs, labels, cports, port):
    svcs = [(p, s) for p, s in find(docs, "Service")
            if all(labels.get(k) == v for k, v in (s["spec"].get("selector") or {}).items())
            and s["spec"].get("selector")]
    c.check(svcs, "deploy/k8s", "no Service selects the blockserve pods")
    for p, s in svcs:
        for sp in s["spec"]["ports"]:
            t = sp.get("targetPort", sp["port"])
            c.check(t in cports or t in cports.values(), p, "Service %s targets %s, which the "
                    "container does not expose" % (s["metadata"]["name"], t))
    headless = [s for _, s in svcs if s["spec"].get("clusterIP") == "None"]
    ctx.headless = headless
    if c.check(headless, "deploy/k8s", "no headless Service (clusterIP: None) for Envoy's DNS discovery"):
        c.check(any(int(sp["port"]) == port for sp in headless[0]["spec"]["ports"]),
                "deploy/k8s", "the headless Service has no port %d" % port)


def check_hpas(c, docs, dep, container):
    hpas = find(docs, "HorizontalPodAutoscaler")
    c.check(hpas, "deploy/k8s", "no HorizontalPodAutoscaler")
    for p, h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        c.check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"] and
                ref.get("apiVersion") == "apps/v1", p, "scaleTargetRef %s/%s is not the Deployment %s"
                % (ref["kind"], ref["name"], dep["metadata"]["name"]))
        c.check(1 <= h["spec"].get("minReplicas", 1) <= h["spec"]["maxReplicas"], p,
                "minReplicas exceeds maxReplicas")
        for m in h["spec"].get("metrics", []):
            if m["type"] == "Resource" and m["resource"]["name"] == "cpu":
                c.check("cpu" in container.get("resources", {}).get("requests", {}), p,
                        "CPU utilisation needs CPU requests on the container")
            if m["type"] == "Pods":
                name = m["pods"]["metric"]["name"]
                rules = []
                adapters = [d for q, ds in docs.items() for d in ds if "rules" in d]
                for a in adapters:
                    for r in a["rules"].get("custom", []):
                        rules.append((r.get("name") or {}).get("as") or r["seriesQuery"].split("{")[0])
                c.check(name in rules, p, "custom metric %s is not produced by any prometheus-adapter "
                        "rule (%s)" % (name, rules))


def check_envoy(ctx, c, docs):
    path = os.path.join(ctx.root, "deploy", "envoy", "envoy.yaml")
    where = "deploy/envoy/envoy.yaml"
    env = dl.load_docs(path)[0]
    sr = env["static_resources"]
    clusters = {cl["name"]: cl for cl in sr["clusters"]}
    listeners = sr["listeners"]
    c.check(any(int(ls["address"]["socket_address"]["port_value"]) == ctx.grpc_port
                for ls in listeners), where,
            "no listener on the gRPC port %d (clients call Envoy as they call the server)" % ctx.grpc_port)
    routes = []
    for ls in listeners:
        for fc in ls["filter_chains"]:
            for f in fc["filters"]:
                tc = f.get("typed_config", {})
                if not tc.get("@type", "").endswith("HttpConnectionManager"):
                    continue
                c.check(tc.get("codec_type", "AUTO") in ("AUTO", "HTTP2"), where,
                        "the listener's codec %s cannot carry gRPC" % tc.get("codec_type"))
                c.check(any(h["name"] == "envoy.filters.http.router" for h in tc.get("http_filters", [])),
                        where, "no router filter")
                for vh in tc["route_config"]["virtual_hosts"]:
                    routes += [r["route"] for r in vh["routes"] if "route" in r]
    c.check(routes, where, "no routes")
    for r in routes:
        c.check(r["cluster"] in clusters, where, "route to unknown cluster %s" % r["cluster"])
        c.check(str(r.get("timeout")) in ("0s", "0"), where,
                "route timeout %s would cut ModelStreamInfer streams (Envoy's default is 15 s)"
                % r.get("timeout", "unset"))
    headless = getattr(ctx, "headless", [])
    kust = dl.load_docs(os.path.join(ctx.root, "deploy", "kustomization.yaml"))[0]
    ns = kust.get("namespace", "default")
    for name, cl in clusters.items():
        c.check(cl.get("type") == "STRICT_DNS", where, "cluster %s: type %s does not spread over every replica (STRICT_DNS)"
                % (name, cl.get("type")))
        opts = cl.get("typed_extension_protocol_options", {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        h2 = (opts.get("explicit_http_config") or {}).get("http2_protocol_options")
        if c.check(h2 is not None, where, "cluster %s does not speak HTTP/2 upstream (gRPC needs it)"
                   % name):
            mcs = h2.get("max_concurrent_streams")
            c.check(mcs is not None and int(mcs) <= ctx.max_streams, where,
                    "cluster %s: max_concurrent_streams %s exceeds the server's "
                    "--max-concurrent-streams %d" % (name, mcs, ctx.max_streams))
        c.check(any("grpc_health_check" in hc for hc in cl.get("health_checks", [])), where,
                "cluster %s has no gRPC health check" % name)
        for ep in cl["load_assignment"]["endpoints"]:
            for lb in ep["lb_endpoints"]:
                sa = lb["endpoint"]["address"]["socket_address"]
                c.check(int(sa["port_value"]) == ctx.grpc_port, where,
                        "endpoint port %s is not the gRPC port %d" % (sa["port_value"], ctx.grpc_port))
                host = sa["address"].split(".")
                names = [s["metadata"]["name"] for s in headless]
                c.check(host[0] in names and len(host) > 1 and host[1] == ns, where,
                        "endpoint %s is not a headless Service of namespace %s (%s)"
                        % (sa["address"], ns, names))

    # Envoy in Kubernetes: the ConfigMap made from this file, mounted where -c points.
    gens = {g["name"]: g for g in kust.get("configMapGenerator", [])}
    for p, d in find(docs, "Deployment"):
        for x in d["spec"]["template"]["spec"]["containers"]:
            if "envoy" not in x["image"]:
                continue
            conf = dl.flag_value(x.get("args", []), "-c")
            vols = {v["name"]: v for v in d["spec"]["template"]["spec"].get("volumes", [])}
            ok = False
            for m in x.get("volumeMounts", []):
                cm = (vols.get(m["name"], {}).get("configMap") or {}).get("name")
                if cm in gens and conf and os.path.dirname(conf) == m["mountPath"].rstrip("/"):
                    for f in gens[cm].get("files", []):
                        key, _, src = f.partition("=")
                        src = src or key
                        if key == os.path.basename(conf) and \
                                os.path.samefile(os.path.join(ctx.root, "deploy", src), path):
                            ok = True
            c.check(ok, p, "Envoy's -c %s is not deploy/envoy/envoy.yaml through the kustomize "
                    "ConfigMap" % conf)
            lports = {int(ls["address"]["socket_address"]["port_value"]) for ls in listeners}
            for cp in x.get("ports", []):
                c.check(int(cp["containerPort"]) in lports, p, "Envoy containerPort %s has no listener"
                        % cp["containerPort"])


def check_kustomization(ctx, c, docs):
    where = "deploy/kustomization.yaml"
    kpath = os.path.join(ctx.root, "deploy", "kustomization.yaml")
    kust = dl.load_docs(kpath)[0]
    res = [os.path.normpath(r) for r in kust.get("resources", [])]
    for r in res:
        c.check(os.path.exists(os.path.join(ctx.root, "deploy", r)), where, "resource %s does not exist" % r)
    for p in docs:
        rel = os.path.relpath(p, "deploy")
        if os.path.dirname(rel) == "k8s":  # custom-metrics/ is the optional variant
            c.check(rel in res, where, "%s is not among the resources" % p)
    images = {i["name"] for i in kust.get("images", [])}
    dep = getattr(ctx, "k8s_deployment", None)
    if dep:
        for x in dep["spec"]["template"]["spec"]["containers"]:
            c.check(x["image"].split(":")[0] in images, where,
                    "the image %s has no images: entry to set its registry" % x["image"])
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", os.path.join(ctx.root, "deploy")],
                             capture_output=True, text=True, timeout=120)
        c.check(out.returncode == 0, where, "kubectl kustomize fails: " + out.stderr.strip())
    else:
        c.note("kubectl is not installed: `kubectl kustomize deploy/` not rendered")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--blockserve", required=True)
    ap.add_argument("--build-dir")
    args = ap.parse_args()
    args.root = os.path.abspath(args.root)
    args.blockserve = os.path.abspath(args.blockserve)
    if args.build_dir:
        args.build_dir = os.path.abspath(args.build_dir)
    os.chdir(args.root)
    c = Checks()
    ctx = Context(args, c)
    docs = k8s_docs(args.root)
    check_dockerfile(ctx, c, args.build_dir)
    check_dockerignore(ctx, c)
    check_compose(ctx, c)
    check_k8s(ctx, c, docs)
    check_kustomization(ctx, c, docs)
    check_envoy(ctx, c, docs)
    for n in c.notes:
        print("NOTE:", n)
    for f in c.failures:
        print("FAIL:", f)
    print("check_deploy: %d checks passed, %d failed (gRPC port %d, metrics port %s, from %s)"
          % (c.passed, len(c.failures), ctx.grpc_port, ctx.metrics_port, args.blockserve))
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
