#!/usr/bin/env python3
"""A small `helm` for Caravan's scripts and tests, on the official Helm v4 Go
SDK bundled by the PyPI package helm-python-sdk (no helm binary needed).

  helm.py lint CHART [--set-json JSON]
  helm.py install RELEASE CHART --namespace NS --kubeconfig FILE [--set-json JSON]
  helm.py upgrade RELEASE CHART --namespace NS --kubeconfig FILE [--set-json JSON]
  helm.py rollback RELEASE [REVISION] --namespace NS --kubeconfig FILE
  helm.py uninstall RELEASE --namespace NS --kubeconfig FILE
  helm.py template RELEASE CHART --namespace NS [--set-json JSON]
"""
import argparse
import json
import sys

import helm_python as helm


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["lint", "install", "upgrade", "rollback", "uninstall", "template"])
    p.add_argument("args", nargs="+")
    p.add_argument("--namespace", default="default")
    p.add_argument("--kubeconfig")
    p.add_argument("--set-json", default="{}")
    a = p.parse_args()
    values = json.loads(a.set_json)
    try:
        if a.action == "lint":
            report = helm.lint(a.args[0], values, strict=True)
            for m in report.get("messages", []):
                print(f"[{m['severity']}] {m['path']}: {m['error']}")
            return 1 if report.get("errors") or any(m["severity"] >= 2 for m in report.get("messages", [])) else 0
        if a.action == "template":
            chart = helm.Chart.load(a.args[1])
            print(json.dumps(chart.render(values, name=a.args[0], namespace=a.namespace, is_install=True), indent=1))
            return 0
        cfg = helm.Config(kubeconfig_path=a.kubeconfig, namespace=a.namespace, kube_insecure_skip_tls_verify=True)
        if a.action == "install":
            rel = cfg.install(a.args[1], a.args[0], values, namespace=a.namespace, timeout=120)
        elif a.action == "upgrade":
            rel = cfg.upgrade(a.args[1], a.args[0], values, namespace=a.namespace, timeout=120)
        elif a.action == "rollback":
            # To the revision named, or the one before the current.
            revision = int(a.args[1]) if len(a.args) > 1 else None
            cfg.rollback(a.args[0], version=revision, timeout=120)
            rel = cfg.status(a.args[0])
        else:
            cfg.uninstall(a.args[0])
            print(f"uninstalled {a.args[0]}")
            return 0
        revision = rel.get("version", rel.get("revision", "?"))
        status = rel.get("info", {}).get("status") or rel.get("status", "")
        print(f"{a.action}: release {rel.get('name', a.args[0])} revision {revision} {status}")
        return 0
    except helm.HelmError as e:
        print(f"helm {a.action}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
