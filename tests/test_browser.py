"""The web page in a real headless Chromium: upload an image, ask, see a reply with a generated image.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`) and
`pip install selenium`. The screenshot is kept at tests/artifacts/browser_chat.png.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_serve import image_checkpoint, png_bytes  # noqa: F401  (the fixture, used by name)
from tests.test_serve_load import running_server

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def browser():
    if not CHROMIUM.exists() or not DRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {DRIVER}: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(DRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_an_image_ask_and_see_a_reply_with_a_generated_image(browser, image_checkpoint, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes(32))
    with running_server(image_checkpoint) as (base, _):
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "modality")).options) > 1)
        browser.find_element(By.ID, "files").send_keys(str(picture))
        browser.find_element(By.ID, "prompt").send_keys("What is this? Draw another.")
        Select(browser.find_element(By.ID, "modality")).select_by_value("image")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("12")
        browser.find_element(By.ID, "send").click()
        reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))[0]
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "browser_chat.png"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        [uploaded] = browser.find_elements(By.CSS_SELECTOR, ".user img")
        assert uploaded.get_attribute("src").startswith("data:image/png;base64,")
        generated = reply.find_elements(By.CSS_SELECTOR, "img.media-image")
        assert generated and generated[0].get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", generated[0]) == 8
        browser.find_element(By.ID, "new-chat").click()
        assert not browser.find_elements(By.CSS_SELECTOR, ".turn")
    assert (ARTIFACTS / "browser_chat.png").stat().st_size > 0


def test_an_example_request_for_the_embedded_default_model_asked_from_the_page(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mllm.default.examples import EXAMPLES

    with running_server("default:gmm") as (base, _):
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        buttons = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button"))
        assert [b.text for b in buttons] == [e.request for e in EXAMPLES]
        buttons[0].click()  # "Draw the digit 7."
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == EXAMPLES[0].request
        browser.find_element(By.ID, "send").click()
        reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))[0]
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "browser_examples.png"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".error, .cut")
        assert reply.find_elements(By.CSS_SELECTOR, "img.media-image")
        reads = next(i for i, e in enumerate(EXAMPLES) if e.attach)
        buttons[reads].click()  # a new chat, and what to attach first
        assert not browser.find_elements(By.CSS_SELECTOR, ".turn")
        assert browser.find_element(By.ID, "pending").text == f"attach {EXAMPLES[reads].attach} first"
        buttons[0].click()
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("64")  # two short of a drawing
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
        assert "cut at max tokens" in browser.find_element(By.CSS_SELECTOR, ".assistant .cut").text
