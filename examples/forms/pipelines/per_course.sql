-- Consumer 4, added while the others run: submissions per course, kept up to date in
-- SQLite (upserts on the course). It starts at the beginning of `forms`.
CREATE SINK counts WITH (connector = 'sqlite', path = '${SQLITE_PATH}', table = 'per_course',
                         primary_key = 'course', create_table = true);
INSERT INTO counts SELECT course, COUNT(*) AS submissions FROM forms GROUP BY course;
