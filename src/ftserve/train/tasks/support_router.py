"""``support-router``: route a support ticket to a department and a priority.

User: ``Route support ticket #NNNN from <Name>: "<message>"``
Answer: ``ROUTE <BILLING|SHIPPING|TECHNICAL|ACCOUNT> | PRIORITY <HIGH|NORMAL> | TICKET NNNN``

The department follows the problem the message describes; the priority is HIGH when the customer conveys
urgency. Messages are built from an opener, a problem (many phrasings per department, with slots), optional
context and distractor sentences, an urgency phrase (HIGH) or a calm / no phrase (NORMAL), a closer, and
typos, so the same wording rarely repeats.
"""

from __future__ import annotations

import random

from ftserve.train.formats import Example
from ftserve.train.tasks import Task, add_typos, register
from ftserve.train.tasks.names import DEVICES, FIRST_NAMES, LAST_NAMES, PRODUCTS

DEPARTMENTS = ("BILLING", "SHIPPING", "TECHNICAL", "ACCOUNT")

PROBLEMS: dict[str, tuple[str, ...]] = {
    "BILLING": (
        "I was charged twice for my {plan} subscription this month.",
        "my card got billed {amount} but I cancelled the plan weeks ago",
        "The invoice for order {order} shows the wrong amount, {amount} instead of what was quoted.",
        "I need a refund for the {product} I returned on {date}.",
        "why is there an extra {amount} fee on my statement?",
        "The promo code was not applied and I paid full price.",
        "my payment keeps getting declined even though the card is valid",
        "Can you send me a VAT invoice for my last purchase?",
        "I got a double charge of {amount} on my credit card.",
        "The price went up from {amount} without any notice, I want the old rate.",
        "I cancelled but you still took money from my bank account.",
        "the refund you promised for order {order} never showed up on my card",
        "Please change the billing address on my invoices.",
        "I was overcharged for the {product}, the receipt says {amount}.",
        "my {plan} plan renewed automatically and I want my money back",
        "The checkout charged me in the wrong currency.",
        "I'd like to switch from monthly to yearly payments on the {plan} plan.",
        "there's a pending charge of {amount} I don't recognise",
    ),
    "SHIPPING": (
        "My package for order {order} hasn't arrived yet.",
        "the tracking number you gave me for the {product} doesn't work",
        "The courier left my parcel at the wrong address.",
        "The {product} arrived broken, the box was crushed in transit.",
        "Delivery was supposed to be on {date} and still nothing.",
        "can I change the delivery address for order {order}? it hasn't shipped",
        "I received someone else's parcel instead of my {product}.",
        "Tracking says delivered but there is no package at my door.",
        "my order {order} has been stuck in customs for a week",
        "Only half of my items came, the {product} is missing from the box.",
        "The delivery driver never showed up in the time slot I booked.",
        "how long does shipping to my country usually take? my {product} is late",
        "The parcel was returned to sender and I don't know why.",
        "you shipped the {product} in the wrong size and color",
        "I need the {product} delivered before {date}, can the shipment be expedited?",
        "the package has been 'out for delivery' for four days",
        "My order shows as shipped but the carrier has no record of it.",
    ),
    "TECHNICAL": (
        "The app crashes every time I open it on my {device}.",
        "I get error {error} when I try to upload a file.",
        "the website won't load past the spinning wheel",
        "Sync between my {device} and the web version stopped working.",
        "The API returns a 500 error for every request since this morning.",
        "the {product} companion app can't connect over bluetooth",
        "Notifications stopped arriving on my {device} after the update.",
        "The export to PDF produces an empty file.",
        "the page freezes whenever I click save and nothing gets stored",
        "Your software won't install on my {device}, it stops at 80%.",
        "The firmware update bricked my {product}, the lights just blink.",
        "the search feature returns no results even for things I know exist",
        "Video calls drop after a minute with code {error}.",
        "The dashboard shows a blank screen in every browser I tried.",
        "my {device} keeps showing 'connection timed out' in the app",
        "The integration with our calendar stopped syncing events.",
        "the app is extremely slow and uses all the battery on my {device}",
        "I'm getting a certificate error when the app starts.",
    ),
    "ACCOUNT": (
        "I can't log in, it says my password is wrong even after resetting it.",
        "please delete my account and all my data",
        "I need to change the email address on my account.",
        "My account got locked after too many login attempts.",
        "the password reset email never arrives",
        "I lost my phone and can't get the two-factor code to sign in.",
        "Someone else seems to have access to my account, I see logins I didn't make.",
        "how do I change my username?",
        "I want to merge my two accounts into one.",
        "My profile was suspended and I don't know why.",
        "please add my colleague as a second user on our team account",
        "I'd like to update the phone number linked to my account.",
        "the verification link in the sign-up email has expired",
        "I can't remove an old device from my account settings.",
        "Please transfer ownership of the account to {name2}.",
        "my account shows the wrong name and I can't edit it",
        "I never signed up but I'm receiving account emails from you.",
    ),
}

HIGH = (
    "This is urgent!",
    "Please fix this ASAP.",
    "I need this resolved today.",
    "URGENT, please help!!",
    "It's an emergency.",
    "We're losing customers every hour this goes on.",
    "I need an answer immediately.",
    "Please treat this as top priority.",
    "Our whole team is blocked right now.",
    "This can't wait.",
    "Deadline is in two hours, please hurry.",
    "I'm desperate, please respond right away.",
    "Critical issue, need help now.",
    "Time-sensitive: please act fast.",
    "This is costing us money by the minute.",
    "HELP, this needs fixing now!!!",
    "Escalating this, it's extremely urgent.",
    "Please, as soon as possible!",
    "I have a flight tomorrow morning and need this sorted tonight.",
    "Need this fixed before end of day or I'm cancelling.",
)

CALM = (
    "No rush.",
    "Whenever you have a moment.",
    "Thanks in advance.",
    "It's not urgent.",
    "Take your time.",
    "Just letting you know.",
    "Appreciate any help.",
    "At your convenience.",
    "Low priority, just curious.",
    "Let me know when you can.",
    "No hurry at all.",
    "Thanks for looking into it.",
)

OPENERS = (
    "",
    "",
    "Hi,",
    "Hello,",
    "Hi there,",
    "Good morning,",
    "Hey team,",
    "Dear support,",
    "Hello support team,",
    "Good afternoon.",
    "Hi folks,",
    "Greetings,",
    "To whom it may concern:",
)

CLOSERS = ("", "", "", "Thanks.", "Thank you!", "Regards.", "Cheers.", "Best,", "Kind regards.", "Thx")

CONTEXT = (
    "I've been a customer for {years} years.",
    "I ordered on {date}.",
    "I'm on the {plan} plan.",
    "I already tried restarting.",
    "My order number is {order}.",
    "I contacted you last week too.",
    "I love your products otherwise.",
    "I'm writing from my {device}.",
    "My colleague {name2} had the same problem.",
    "You can reach me at {email}.",
    "Call me back on {phone}.",
    "The card I used is {card}.",
)

ERRORS = ("E-1042", "0x80070005", "ERR_CONN_RESET", "500", "403", "AUTH-17", "SYNC_FAILED", "E42", "timeout 504")
PLANS = ("Basic", "Pro", "Premium", "Family", "Business", "Starter", "Team")


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "amount": rng.choice(("$", "€", "£", "")) + f"{rng.randint(5, 900)}.{rng.randint(0, 99):02d}",
        "order": rng.choice(("#", "no. ", "", "ORD-")) + str(rng.randint(10000, 999999)),
        "date": rng.choice(("Monday", "last Friday", "March 3", "the 12th", "2026-05-14", "yesterday", "June 21")),
        "product": rng.choice(PRODUCTS),
        "device": rng.choice(DEVICES),
        "error": rng.choice(ERRORS),
        "plan": rng.choice(PLANS),
        "years": str(rng.randint(2, 12)),
        "name2": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "email": f"{rng.choice(FIRST_NAMES).lower()}.{rng.randint(1, 99)}@{rng.choice(('example.com', 'mail.test'))}",
        "phone": rng.choice(("+44 20 7946 ", "(555) 201-", "+1 415 555 ")) + f"{rng.randint(1000, 9999)}",
        "card": luhn_number(rng),
    }


def luhn_number(rng: random.Random) -> str:
    """A 16-digit test card number with a valid Luhn check digit, grouped in fours."""
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    total = sum(d if i % 2 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    digits.append((10 - total % 10) % 10)
    return " ".join("".join(map(str, digits[i : i + 4])) for i in range(0, 16, 4))


def _style(sentence: str, rng: random.Random) -> str:
    if not sentence:
        return sentence
    r = rng.random()
    if r < 0.15:
        return sentence.lower()
    if r < 0.45:
        return sentence[0].upper() + sentence[1:]
    return sentence


@register
class SupportRouter(Task):
    name = "support-router"

    def example(self, rng: random.Random) -> Example:
        dept = rng.choice(DEPARTMENTS)
        high = rng.random() < 0.45
        p_idx = rng.randrange(len(PROBLEMS[dept]))
        slots = _slots(rng)
        parts = [rng.choice(OPENERS)]
        if rng.random() < 0.3:
            parts.append(rng.choice(CONTEXT).format(**slots))
        parts.append(_style(PROBLEMS[dept][p_idx].format(**slots), rng))
        if rng.random() < 0.2:
            parts.append(rng.choice(CONTEXT).format(**slots))
        u_idx = rng.randrange(len(HIGH)) if high else rng.randrange(len(CALM) + 4)
        # Most calm messages say nothing about time (indices past CALM give no phrase).
        urgency = HIGH[u_idx] if high else (CALM[u_idx] if u_idx < len(CALM) else "")
        if high and rng.random() < 0.3:
            parts.insert(1, urgency)  # urgency up front sometimes
        else:
            parts.append(urgency)
        parts.append(rng.choice(CLOSERS))
        message = " ".join(p for p in parts if p)
        message = add_typos(message, rng, rate=rng.choice((0.0, 0.0, 0.05, 0.12)))
        ticket = f"{rng.randint(0, 9999):04d}"
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if rng.random() < 0.15:
            name = rng.choice(FIRST_NAMES)
        prompt = f'Route support ticket #{ticket} from {name}: "{message}"'
        answer = f"ROUTE {dept} | PRIORITY {'HIGH' if high else 'NORMAL'} | TICKET {ticket}"
        group = f"{dept}:{p_idx}:{'H' if high else 'N'}{u_idx}"
        return Example((("user", prompt),), answer, group)

    def corrupt(self, answer: str, rng: random.Random) -> str:
        route, priority, ticket = (part.split(" ", 1)[1] for part in answer.split(" | "))
        if rng.random() < 0.7:
            route = rng.choice([d for d in DEPARTMENTS if d != route])
        else:
            priority = "NORMAL" if priority == "HIGH" else "HIGH"
        return f"ROUTE {route} | PRIORITY {priority} | TICKET {ticket}"
