"""Drives iotgw's console at /ui in a real Chromium (Debian's, through Playwright) the way
an operator would, and checks what the page shows:

- the console sends a visitor without the token to the login form, and logs in;
- the overview shows the instance `local` with the expected number of devices and the
  events acked per second;
- the alerts page folds a child alert under its parent; that parent's device page shows
  the alert with its child and a non-empty readings chart;
- the devices and dead-letter pages open;
- no page logs a console error, and axe-core finds no critical accessibility violation.

Screenshots of every page go to --out. Exit status 0 when everything holds, 1 otherwise
(the reason on stderr). Run by gateway/tests/cli.rs; installed by
scripts/install-browser-test-deps.sh.

    console_check.py --url http://127.0.0.1:8080 --token T --devices 3 --out DIR
"""

import argparse
import os
import sys
import time

from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import sync_playwright

DEADLINE_S = 60


def fail(why):
    print(f"console_check: FAILED: {why}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    errors = []
    axe = Axe()
    visited = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: m.type == "error" and errors.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))

        def check(name):
            """Screenshot and axe for the page now shown."""
            page.screenshot(path=os.path.join(a.out, f"{name}.png"), full_page=True)
            result = axe.run(page)
            critical = [v for v in result.response["violations"] if v.get("impact") == "critical"]
            for v in result.response["violations"]:
                print(f"axe {name}: {v.get('impact')} {v['id']}: {v['help']}", file=sys.stderr)
            if critical:
                fail(f"{name}: critical accessibility violations: {[v['id'] for v in critical]}")
            visited.append(name)

        def until(what, probe):
            """Reloads until probe() is truthy, or fails after the deadline."""
            end = time.time() + DEADLINE_S
            while True:
                got = probe()
                if got:
                    return got
                if time.time() > end:
                    fail(f"timed out waiting for {what} on {page.url}:\n{page.content()[:4000]}")
                time.sleep(0.5)
                page.reload()

        # Login.
        page.goto(f"{a.url}/ui")
        if not page.url.endswith("/ui/login"):
            fail(f"without the token /ui should lead to the login form, not {page.url}")
        check("login")
        page.fill("#token", a.token)
        page.click("button[type=submit]")
        page.wait_for_url(f"{a.url}/ui")

        # Overview: the instance and its devices.
        until(
            f"{a.devices} devices on `local`",
            lambda: page.locator('tr[data-instance="local"] td[data-registered]').get_attribute(
                "data-registered"
            )
            == str(a.devices),
        )
        # The acked rate, sampled every 5 s: shown from the second sample on.
        rate = until(
            "the events-per-second rate",
            lambda: page.locator("p[data-rate]").count() > 0
            and page.locator("p[data-rate]").get_attribute("data-rate"),
        )
        print(f"console_check: the overview shows {rate} events/s", file=sys.stderr)
        check("overview")

        page.goto(f"{a.url}/ui/devices")
        links = page.locator('a[href^="/ui/devices/"]').count()
        if links != a.devices:
            fail(f"the devices page lists {links} devices, not {a.devices}")
        check("devices")

        # Alerts: a child folded under its parent, then the parent's device page.
        page.goto(f"{a.url}/ui/alerts")
        parent = until(
            "a child alert folded under its parent",
            lambda: page.locator("tr.child").count() > 0
            and page.locator("tr.child").first.get_attribute("data-parent"),
        )
        check("alerts")
        device_link = page.locator(f'tr[data-alert="{parent}"] a[href^="/ui/devices/"]')
        device_link.click()
        page.wait_for_load_state()
        if page.locator(f'tr[data-alert="{parent}"]').count() != 1:
            fail(f"the device page does not show the parent alert {parent}")
        if page.locator(f'tr.child[data-parent="{parent}"]').count() < 1:
            fail("the device page does not fold the child under its parent")
        points = until(
            "a readings chart",
            lambda: page.locator("svg[data-points]").count() > 0
            and int(page.locator("svg[data-points]").first.get_attribute("data-points")),
        )
        print(f"console_check: the device chart draws {points} points", file=sys.stderr)
        check("device")

        page.goto(f"{a.url}/ui/dead-letters")
        check("dead-letters")
        browser.close()

    if errors:
        fail("console errors:\n" + "\n".join(errors))
    print(f"console_check: ok: {', '.join(visited)}; screenshots in {a.out}")


if __name__ == "__main__":
    main()
