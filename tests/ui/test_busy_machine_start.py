"""The app starts on a busy machine: Gradio's own localhost check gives the page one 3-second request and then
refuses to start; ours asks again until the page answers."""
import http.server
import threading
import time


def test_a_page_that_answers_late_still_counts_as_reachable():
    from gradio import networking

    from ui.app import patient_localhost_check

    asked = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            asked.append(time.monotonic())
            time.sleep(4)  # a busy machine: every answer comes after Gradio's 3-second timeout
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real = networking.url_ok
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        assert not real(url)  # Gradio alone: the app would refuse to start
        patient_localhost_check(seconds=20)
        assert networking.url_ok(url)
    finally:
        networking.url_ok = real
        server.shutdown()
