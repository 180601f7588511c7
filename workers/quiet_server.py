"""Imported first by a forkserver (lifeline.PRELOAD), and by nothing else: from here on it ignores Ctrl-C.

The server ignores SIGINT itself only once it has imported all of PRELOAD (seconds: torch), so a Ctrl-C
meanwhile printed its KeyboardInterrupt traceback. Its forks get Ctrl-C back (lifeline.restore_interrupts).
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
