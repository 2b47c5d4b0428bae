"""A screenshot of the guided-generation page (`lime-hf app`) on a saved model, as a user drives it.

Serves MODEL_DIR on a free loopback port, opens the page in headless Debian Chromium (selenium, the system
chromedriver), types the prompt, picks one POS tag per step, clicks Generate and saves the page as a PNG.

    python benchmarks/app_screenshot.py lime-demo/lime-plus-1 --prompt "After these things" \\
        --guide ", NNP VBD IN PRP$ NN ." --output docs/app.png
"""

from __future__ import annotations

import argparse
import shutil
import threading
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

# Chromium on a machine with no network beyond loopback: without the background-networking flags it keeps
# trying (and failing) to reach Google's services.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def start_chromium(profile: Path, window: str = "1100,560") -> Any:
    """A selenium driver of the system's Chromium, headless, with a fresh profile in `profile`."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def drive(driver: Any, page: str, prompt: str, schedule: list[str], steps: int) -> None:
    """Type the prompt, set the steps, pick the POS schedule, generate, and wait for every token."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    driver.get(page)
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    field = driver.find_element(By.ID, "prompt")
    field.clear()
    field.send_keys(prompt)
    count = driver.find_element(By.ID, "steps")
    count.clear()
    count.send_keys(str(steps))
    field.click()  # leaving the steps field fires `change`, which rebuilds the guide table
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "select[data-field=pos]")) == steps)
    for step, label in enumerate(schedule):
        Select(driver.find_element(By.ID, f"guide-pos-{step}")).select_by_value(label)
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens .token")) == steps)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lime_hf.integrations.app import AppServer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a saved LIME+1 model folder (model and LimeTokenizer)")
    parser.add_argument("--prompt", default="After these things")
    parser.add_argument(
        "--guide", default=", NNP VBD IN PRP$ NN .", help="space-separated POS tags, one per step"
    )
    parser.add_argument("--output", type=Path, default=Path("docs/app.png"))
    parser.add_argument("--name", help="the model's name on the page (default: the folder)")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    server = AppServer(("127.0.0.1", 0), model, tokenizer, name=args.name or args.model)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    schedule = args.guide.split()
    with TemporaryDirectory() as profile:
        driver = start_chromium(Path(profile))
        try:
            drive(
                driver, f"http://127.0.0.1:{server.server_address[1]}/", args.prompt, schedule, len(schedule)
            )
            args.output.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.output))
        finally:
            driver.quit()
            server.shutdown()
    print(f"Saved {args.output}")


if __name__ == "__main__":
    main()
