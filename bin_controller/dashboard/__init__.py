"""`smartbin dashboard`: a web dashboard for one bin or a fleet, an MQTT client of its own.

fleet.py (the view model from MQTT messages), history.py (what the charts show, in SQLite),
auth.py (passwords, sessions, CSRF, roles), bridge.py (the MQTT client: messages in,
commands out), web.py (the routes), command.py (the command line), static/ (the pages).
"""
