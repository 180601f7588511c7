"""Imported first by a forkserver (lifeline.PRELOAD), and by nothing else: from here on it ignores Ctrl-C and SIGHUP.

The server ignores SIGINT itself only once it has imported all of PRELOAD (seconds: torch), so a Ctrl-C
meanwhile printed its KeyboardInterrupt traceback. Its forks get Ctrl-C back (lifeline.restore_interrupts).
SIGHUP (the terminal closed) stays ignored in its forks, the stages: the launcher stops them with SIGTERM as it
stops the run, and a server killed by it would leave the launcher blind to them (their exit status comes through
the server: a stage still running would read as ended).
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
