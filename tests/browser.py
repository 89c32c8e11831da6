"""Open a report in headless Chromium (Debian's chromium and chromium-driver, driven by selenium):
a screenshot, every image loaded, no console error, and the page's text. The browser test
(tests/test_report.py) uses it, and so does the README's screenshot:

    python tests/browser.py runs/ASEN/report/index.html images/report.png [HEIGHT]

No browser is downloaded at run time: the driver is /usr/bin/chromedriver (or $CHROMEDRIVER).
"""
import os
import shutil
import sys

CHROMIUM = os.environ.get('CHROMIUM', shutil.which('chromium') or '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('CHROMEDRIVER', shutil.which('chromedriver') or '/usr/bin/chromedriver')


def missing():
    """Why the browser cannot run here (a line), or '' when it can."""
    for path, package in ((CHROMIUM, 'chromium'), (CHROMEDRIVER, 'chromium-driver')):
        if not os.path.isfile(path):
            return f"{path} not found: apt-get install chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -r requirements.txt"
    return ''


def open_page(path, screenshot=None, width=1100, height=900):
    """Load the file `path`; returns {'images': [(src, loaded)], 'severe': [console errors],
    'text': the page's text, 'ids': section ids}. `screenshot`: a PNG of the top of the page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                 f'--window-size={width},{height}', '--hide-scrollbars'):
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get('file://' + os.path.abspath(path))
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);")
        result = dict(images=[tuple(pair) for pair in images],
                      severe=[e for e in driver.get_log('browser') if e.get('level') == 'SEVERE'],
                      text=driver.find_element('tag name', 'body').text,
                      ids=driver.execute_script("return Array.from(document.querySelectorAll('section[id]'))"
                                                ".map(s => s.id);"))
        if screenshot:
            driver.save_screenshot(screenshot)
        return result
    finally:
        driver.quit()


def shrink(png, max_width=720, colours=128):
    """Make a screenshot small enough to commit: scaled to max_width, a palette of `colours`."""
    from PIL import Image
    with Image.open(png) as image:
        image = image.convert('RGB')
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        image.quantize(colours).save(png, optimize=True)


def main(argv):
    if len(argv) not in (2, 3):
        print('usage: python tests/browser.py REPORT.html SCREENSHOT.png [HEIGHT (pixels, default 2000)]',
              file=sys.stderr)
        return 2
    why = missing()
    if why:
        print(f'error: {why}', file=sys.stderr)
        return 1
    result = open_page(argv[0], argv[1], height=int(argv[2]) if len(argv) > 2 else 2000)
    shrink(argv[1])
    broken = [src for src, ok in result['images'] if not ok]
    print(f"{len(result['images'])} images, {len(broken)} broken, {len(result['severe'])} console errors; "
          f"screenshot {argv[1]} ({os.path.getsize(argv[1]) // 1024} KiB)")
    return 1 if broken or result['severe'] else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
