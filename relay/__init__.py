"""The asyncio SIP relay: a sans-IO SIP core with thin asyncio transports around it."""
