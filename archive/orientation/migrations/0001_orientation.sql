-- The orientation provider's tables (component "orientation"): reading
-- groups and their members, and the on-call rota.
--
-- Times of the rota are local wall-clock times of the requesting site
-- ('HH:MM', end '24:00' allowed), dates are the site's dates ('YYYY-MM-DD'),
-- and an exception's bounds are local date-times ('YYYY-MM-DDTHH:MM'), so
-- that a shift keeps its meaning across a daylight-saving change.  These
-- fixed-width texts compare in time order.  ``sites`` is a JSON array of site
-- or region names; '[]' means every site.  The tables are small (a region's
-- rota is tens of rows): they are read whole.

CREATE TABLE orientation_groups (
    id {pk},
    name TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    created_at {timestamp} NOT NULL
);

CREATE TABLE orientation_members (
    group_name TEXT NOT NULL REFERENCES orientation_groups (name),
    member TEXT NOT NULL,
    added_at {timestamp} NOT NULL,
    PRIMARY KEY (group_name, member)
);
CREATE INDEX orientation_members_by_member ON orientation_members (member);

-- day: mon .. sun, or holiday (the schedule of a holiday; without such
-- entries a holiday follows Sunday's).  A shift whose end is not after its
-- start crosses midnight and belongs to the day it starts.
CREATE TABLE orientation_weekly (
    id {pk},
    group_name TEXT NOT NULL REFERENCES orientation_groups (name),
    day TEXT NOT NULL,
    start_time TEXT NOT NULL,
    end_time TEXT NOT NULL,
    sites TEXT NOT NULL DEFAULT '[]',
    created_at {timestamp} NOT NULL
);

-- group_name NULL: nobody is on call.  replaces: only when that group would
-- otherwise be on call.
CREATE TABLE orientation_exceptions (
    id {pk},
    starts TEXT NOT NULL,
    ends TEXT NOT NULL,
    group_name TEXT REFERENCES orientation_groups (name),
    replaces TEXT REFERENCES orientation_groups (name),
    sites TEXT NOT NULL DEFAULT '[]',
    note TEXT NOT NULL DEFAULT '',
    created_at {timestamp} NOT NULL
);
CREATE INDEX orientation_exceptions_by_time ON orientation_exceptions (starts, ends);

CREATE TABLE orientation_holidays (
    id {pk},
    day TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    sites TEXT NOT NULL DEFAULT '[]',
    created_at {timestamp} NOT NULL
);
CREATE INDEX orientation_holidays_by_day ON orientation_holidays (day);
