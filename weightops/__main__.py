from weightops import signals

signals.install()  # first: Ctrl-C during the imports below is handled too
try:
    from weightops.console import main
except KeyboardInterrupt:
    signals.exit_stopped()

main()
