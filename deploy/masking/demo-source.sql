-- The demo source database `vertebra up` puts in the volume `demo` (as app.db): a few customers with
-- personal data that must never reach a developer. deploy/masking/mask-demo.sql masks it.
CREATE TABLE customers(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    phone TEXT NOT NULL,
    card TEXT NOT NULL,
    balance_cents INTEGER NOT NULL
);
INSERT INTO customers(name, email, phone, card, balance_cents) VALUES
    ('Ada Lovelace',   'ada.lovelace@example.com',   '+44 20 7946 0018', '4556 7375 8689 9855', 120050),
    ('Alan Turing',    'alan.turing@example.com',    '+44 161 496 0213', '4916 3384 1932 0456',   9900),
    ('Grace Hopper',   'grace.hopper@example.com',   '+1 202 555 0147',  '5425 2334 3010 9903', 455000),
    ('Edsger Dijkstra','edsger.dijkstra@example.com','+31 20 794 0512',  '3714 496353 98431',     1234);
CREATE TABLE orders(
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    item TEXT NOT NULL,
    cents INTEGER NOT NULL
);
INSERT INTO orders(customer_id, item, cents) VALUES (1, 'analytical engine', 99900), (2, 'bombe rotor', 4500),
    (3, 'compiler manual', 2500), (4, 'shortest path', 100);
